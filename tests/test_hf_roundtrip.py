"""save_model output loads in transformers; load -> save -> load is bit-identical; bad files."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_checkpoint, torch_logits
from moedistill import hf
from moedistill.errors import CheckpointFileError, ConfigError


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
  model, _ = hf.load_model(src, param_dtype=jnp.bfloat16)
  out = hf.save_model(model, tmp_path / "bf16")
  again, _ = hf.load_model(out, param_dtype=jnp.bfloat16)
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
  from moedistill import safetensors_io as st
  path, _ = hf_tiny
  f = st.SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  key = "model.layers.1.mlp.experts.3.up_proj.weight"
  tensors[key] = tensors[key][:, :-1].copy()
  st.write(path / "model.safetensors", tensors)
  _expect(CheckpointFileError, key, lambda: hf.load_model(path))


def test_unknown_key(hf_tiny):
  from moedistill import safetensors_io as st
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
