"""save_model output loads in transformers; load -> save -> load is bit-identical; sharded loads
read each device's slices alone; exports stream (one merge per layer and projection), in the
chosen dtype, with an index; bad files are named."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_checkpoint, torch_logits
from moedistill.errors import CheckpointFileError, ConfigError
from moedistill.hub import hf
from moedistill.model.layers import Runtime


def _same_state(a, b):
  sa, sb = hf.state_arrays(a), hf.state_arrays(b)
  assert sa.keys() == sb.keys()
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and np.array_equal(np.asarray(sa[k]), np.asarray(sb[k])), k


@pytest.mark.parametrize("max_shard_bytes", [2**30, 30_000])
def test_save_loads_in_transformers_and_roundtrips(tmp_path, hf_tiny, max_shard_bytes):
  from transformers import AutoModelForCausalLM
  src, ref_model = hf_tiny
  (src / "tokenizer.json").write_text("{}")
  model, cfg = hf.load_model(src)
  out = hf.save_model(model, tmp_path / "out", max_shard_bytes=max_shard_bytes,
                      tokenizer_from=src)
  assert (out / "tokenizer.json").exists()
  assert (out / hf.INDEX).exists() == (max_shard_bytes < 2**30)
  theirs = AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 15))
  np.testing.assert_allclose(torch_logits(theirs, tokens), torch_logits(ref_model, tokens),
                             atol=1e-6)
  again, cfg2 = hf.load_model(out)
  assert cfg2 == cfg
  _same_state(model, again)
  out2 = hf.save_model(again, tmp_path / "out2", max_shard_bytes=max_shard_bytes)
  for f in out.glob("*.safetensors"):
    assert f.read_bytes() == (out2 / f.name).read_bytes(), f.name


def test_bf16_save_roundtrip(tmp_path, hf_tiny):
  src, _ = hf_tiny
  model, _ = hf.load_model(src, Runtime(param_dtype=jnp.bfloat16))
  out = hf.save_model(model, tmp_path / "bf16")
  again, _ = hf.load_model(out, Runtime(param_dtype=jnp.bfloat16))
  _same_state(model, again)
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _expect(exc, match, fn):
  with pytest.raises(exc) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg and match in msg, msg


def test_bad_model_type(hf_tiny):
  path, _ = hf_tiny
  d = json.loads((path / "config.json").read_text())
  d["model_type"] = "llama"
  (path / "config.json").write_text(json.dumps(d))
  _expect(ConfigError, "model_type='llama'", lambda: hf.load_model(path))


def test_unsupported_rope_scaling(hf_tiny):
  path, _ = hf_tiny
  d = json.loads((path / "config.json").read_text())
  d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
  (path / "config.json").write_text(json.dumps(d))
  _expect(ConfigError, "rope_type='yarn'", lambda: hf.load_model(path))


def test_missing_shard(tmp_path):
  make_hf_checkpoint(tmp_path, max_shard_size="20KB")
  victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
  victim.unlink()
  _expect(CheckpointFileError, victim.name, lambda: hf.load_model(tmp_path))


def test_wrong_shape(tmp_path, hf_tiny):
  from moedistill.hub import safetensors_io as st
  path, _ = hf_tiny
  f = st.SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  key = "model.layers.1.mlp.experts.3.up_proj.weight"
  tensors[key] = tensors[key][:, :-1].copy()
  st.write(path / "model.safetensors", tensors)
  _expect(CheckpointFileError, key, lambda: hf.load_model(path))


def test_unknown_key(hf_tiny):
  from moedistill.hub import safetensors_io as st
  path, _ = hf_tiny
  f = st.SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  tensors["model.layers.0.mlp.shared_expert.weight"] = np.zeros((2, 2), np.float32)
  st.write(path / "model.safetensors", tensors)
  _expect(CheckpointFileError, "model.layers.0.mlp.shared_expert.weight",
          lambda: hf.load_model(path))


def test_truncated_file_named(hf_tiny):
  path, _ = hf_tiny
  f = path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  _expect(CheckpointFileError, "model.safetensors: truncated", lambda: hf.load_model(path))


def test_inconsistent_header_names_file_and_tensor(hf_tiny):
  import struct
  path, _ = hf_tiny
  f = path / "model.safetensors"
  raw = f.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  key = "model.layers.0.self_attn.q_proj.weight"
  a, b = header[key]["data_offsets"]
  header[key]["data_offsets"] = [a, b - 4]  # one f32 short of its shape
  blob = json.dumps(header).encode()
  f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
  _expect(CheckpointFileError, f"model.safetensors: tensor {key}: offsets",
          lambda: hf.load_model(path))


def test_sharded_load_reads_only_each_devices_slices(tmp_path):
  """8 forced CPU devices: an fsdp and an expert x fsdp load equal the one-device load bit
  for bit; every element is read from the files once (replicas share a read), and each read
  of an expert tensor is one device's slice of it (only the experts that device holds)."""
  import subprocess
  import sys
  from pathlib import Path
  make_hf_checkpoint(tmp_path, max_shard_size="20KB", num_experts=8)
  script = Path(__file__).parent / "sharded_load_check.py"
  r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert [row["mesh"] for row in rows] == [{"data": 1, "fsdp": 8},
                                           {"data": 1, "fsdp": 4, "expert": 2}]
  for row, fsdp, expert in zip(rows, (8, 4), (1, 2)):
    assert row["equal"], row
    assert row["elements_read"] == row["model_elements"], row
    assert row["expert_read_fraction"] == 1 / fsdp, row
    # each expert tensor is read by the fsdp devices of its expert shard, not by all 8
    assert row["expert_reads"] == row["expert_tensors"] * fsdp, row


def test_each_file_is_mapped_once_until_it_holds_release_bytes(tmp_path, monkeypatch):
  """A load maps each shard file once (safe_open parses the whole header each time), not once
  per param; once the tensors read through a mapping hold RELEASE_BYTES it is dropped and the
  next read maps the file again. Both loads equal a load that maps per tensor."""
  from moedistill.hub import safetensors_io as st
  make_hf_checkpoint(tmp_path, max_shard_size="20KB", num_experts=8)
  n_files = len(list(tmp_path.glob("model-*.safetensors")))
  assert n_files >= 3
  opens = []
  real_open = st.safe_open
  monkeypatch.setattr(st, "safe_open",
                      lambda path, **kw: opens.append(path) or real_open(path, **kw))
  model, _ = hf.load_model(tmp_path)
  # one open per file for its header, one to read it
  assert len(opens) == 2 * n_files, opens
  n_params = len(hf.state_arrays(model))
  opens.clear()
  monkeypatch.setattr(st, "RELEASE_BYTES", 1)  # every param's files dropped after it
  again, _ = hf.load_model(tmp_path)
  assert len(opens) >= n_params + n_files
  _same_state(model, again)


@pytest.fixture
def student_dir(tmp_path, hf_tiny):
  from flax import nnx
  import jax
  from moedistill import compress
  from moedistill.model.shared_core import Compression
  teacher, _ = hf.load_model(hf_tiny[0])
  student, _ = compress.compress_model(teacher, Compression(3, 5, 2))
  for p, v in nnx.to_flat_state(nnx.state(student, nnx.Param)):  # wrappers not just an SVD
    v[...] = v[...] + 0.01 * jax.random.normal(jax.random.key(len(p)), v.shape)
  hf.save_model(student, tmp_path / "student", tokenizer_from=hf_tiny[0])
  return tmp_path / "student", student


def test_streamed_export_merges_each_layer_once(tmp_path, student_dir, monkeypatch):
  from moedistill import export
  from moedistill.model.shared_core import merged_experts
  src, student = student_dir
  calls = []
  merge = hf.merge_cast
  monkeypatch.setattr(hf, "merge_cast", lambda *a: calls.append(a) or merge(*a))
  out = export.export(src, tmp_path / "out", max_shard_bytes=30_000)
  cfg = student.config
  assert len(calls) == len(cfg.moe_layers) * 3  # one merge per layer and projection
  index = json.loads((out / hf.INDEX).read_text())
  files = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
  assert set(index["weight_map"]) == {e.hf_key for e in hf.key_table(cfg)}
  assert index["metadata"]["total_size"] == sum(
      int(np.prod(v.shape)) * 4 for v in hf.state_arrays(hf.load_model(out)[0]).values())
  merged = hf.state_arrays(hf.load_model(out)[0])
  s = hf.state_arrays(student)
  base = ("layers", 1, "mlp", "experts")
  want = merged_experts(s[base + ("shared_core", "up")], s[base + ("wrapper", "up_a")],
                        s[base + ("wrapper", "up_b")])
  np.testing.assert_allclose(merged[base + ("up_proj",)], want, rtol=1e-6, atol=1e-7)


def test_export_dtype(tmp_path, student_dir):
  from moedistill import export
  src, student = student_dir
  out = export.export(src, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=30_000)
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  from moedistill.hub.safetensors_io import SafetensorsFile
  for f in out.glob("*.safetensors"):
    st = SafetensorsFile(f)
    assert {st.dtype(k) for k in st.keys()} == {"BF16"}, f
  got = hf.state_arrays(hf.load_model(out)[0])
  ref = hf.state_arrays(hf.load_model(export.export(src, tmp_path / "f32"))[0])
  for k in ref:
    want = np.asarray(ref[k]).astype(jnp.bfloat16).astype(np.float32)
    assert np.array_equal(np.asarray(got[k]), want), k
  for bad in ("int8", "bool", "float99"):
    _expect(ConfigError, f"--dtype={bad!r}",
            lambda: export.export(src, tmp_path / "x", dtype=bad))
  assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_stream_writer_matches_the_library(tmp_path):
  import ml_dtypes
  from safetensors.numpy import load_file
  from moedistill.hub import safetensors_io as st
  r = np.random.RandomState(0)
  tensors = {"b": r.randn(3, 5).astype(ml_dtypes.bfloat16), "a": r.randn(7).astype(np.float32),
             "c": r.randint(0, 9, (2, 2, 2)).astype(np.int32)}
  w = st.StreamWriter(tmp_path / "s.safetensors", [(k, v.shape, v.dtype) for k, v in
                                                   tensors.items()])
  assert not (tmp_path / "s.safetensors").exists()  # only the .tmp until close()
  for k, v in tensors.items():
    w.add(k, v.T.T if k != "b" else np.asfortranarray(v))  # any memory layout
  w.close()
  got = load_file(tmp_path / "s.safetensors")
  assert got.keys() == tensors.keys()
  for k, v in tensors.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
  w = st.StreamWriter(tmp_path / "t.safetensors", [("x", (2,), np.float32)])
  with pytest.raises(ValueError, match="expected x"):
    w.add("x", np.zeros(3, np.float32))
