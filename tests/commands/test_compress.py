"""Compressed student: full rank reproduces the teacher, error falls with rank, compressed
forward equals the merged weights' forward, exports load in transformers and round trip."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import torch_logits
from moedistill import compress, export
from moedistill.errors import ConfigError
from moedistill.hub import hf
from moedistill.model.layers import Runtime
from moedistill.model import ModelConfig, qwen3_30b_a3b
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import Compression

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


def _tokens(cfg, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 14)))


def test_full_rank_reproduces_teacher_and_error_falls_with_rank(hf_tiny):
  path, _ = hf_tiny
  teacher, cfg = hf.load_model(path)
  ref, _ = teacher(_tokens(cfg))
  full = min(cfg.hidden_size, cfg.moe_intermediate_size)
  errs = []
  for r in (1, 4, 10, full):
    student, report = compress.compress_model(teacher, Compression(r, r, r))
    logits, _ = student(_tokens(cfg))
    errs.append((float(np.abs(np.asarray(logits - ref)).max()),
                 max(row[q] for row in report for q in ("gate", "up", "down"))))
  assert errs[-1][0] <= 1e-4 and errs[-1][1] < 1e-5, errs
  recon = [e[1] for e in errs]
  assert all(a > b for a, b in zip(recon, recon[1:])), recon


@pytest.mark.parametrize("backend", ["ragged", "capacity"])
def test_compressed_forward_equals_merged_and_transformers(tmp_path, hf_tiny, backend):
  from transformers import AutoModelForCausalLM
  path, _ = hf_tiny
  teacher, cfg = hf.load_model(path, Runtime(moe_backend=backend, capacity_factor=16.0))
  student, _ = compress.compress_model(teacher, Compression(3, 5, 2))
  # Train-like perturbation so the wrappers are not just an SVD of the teacher.
  for p, v in nnx.to_flat_state(nnx.state(student, nnx.Param)):
    v[...] = v[...] + 0.01 * jax.random.normal(jax.random.key(len(p)), v.shape)
  logits, _ = student(_tokens(cfg))
  hf.save_model(student, tmp_path / "merged", merged=True)
  merged, mcfg = hf.load_model(tmp_path / "merged",
                               Runtime(moe_backend=backend, capacity_factor=16.0))
  assert merged.compression is None and mcfg == cfg
  np.testing.assert_allclose(np.asarray(merged(_tokens(cfg))[0]), np.asarray(logits), atol=1e-5)
  theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  np.testing.assert_allclose(torch_logits(theirs, np.asarray(_tokens(cfg))), np.asarray(logits),
                             atol=1e-4)


def test_native_export_reloads_bit_identically(tmp_path, hf_tiny):
  path, _ = hf_tiny
  teacher, _ = hf.load_model(path)
  student, _ = compress.compress_model(teacher, Compression(4, 4, 3))
  hf.save_model(student, tmp_path / "native", max_shard_bytes=20_000)
  out = export.export(tmp_path / "native", tmp_path / "native2", fmt="native",
                      max_shard_bytes=20_000)
  again, _ = hf.load_model(out)
  assert again.compression == student.compression
  a, b = hf.state_arrays(student), hf.state_arrays(again)
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
  with pytest.raises(ConfigError, match="already exists"):
    export.export(tmp_path / "native", out, fmt="native")


def _closed_form_student(c: ModelConfig, r: int) -> int:
  d, h, f, e = c.hidden_size, c.head_dim, c.moe_intermediate_size, c.num_experts
  attn = d * h * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * h + 2 * d
  experts = 3 * d * f + e * 3 * r * (d + f) + d * e
  return c.num_hidden_layers * (attn + experts) + 2 * c.vocab_size * d + d


@pytest.mark.parametrize("rank", [64, 128])
def test_qwen3_30b_student_param_count(rank):
  cfg = qwen3_30b_a3b()
  abstract = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(
      cfg, rngs=nnx.Rngs(0), compression=Compression(rank, rank, rank)))
  n = compress.param_count(abstract)
  print(f"qwen3_30b_a3b student rank {rank}: {n:,} params ({30_532_122_624 / n:.2f}x smaller)")
  assert n == _closed_form_student(cfg, rank)


def test_cli_compress_and_bad_rank(tmp_path, hf_tiny):
  path, _ = hf_tiny
  run = lambda *a: subprocess.run([sys.executable, "-m", "moedistill.compress", *a],
                                  capture_output=True, text=True)
  ok = run(f"--teacher={path}", f"--out={tmp_path / 's'}", "--rank=4")
  assert ok.returncode == 0, ok.stderr
  assert "compression" in ok.stdout and (tmp_path / "s" / "config.json").exists()
  bad = run(f"--teacher={path}", f"--out={tmp_path / 't'}", "--rank=99")
  assert bad.returncode == 2 and "rank_gate=99" in bad.stderr
  assert "Traceback" not in bad.stderr and not (tmp_path / "t").exists()


def test_routing_weighted_core(tmp_path, teacher_dir):
  from conftest import job_config
  from moedistill.cache_logits import build_cache
  from moedistill.config import job_from_config
  from moedistill.data.cache import CacheReader
  path, _ = teacher_dir
  job = job_from_config(job_config(tmp_path, path))
  reader = CacheReader(build_cache(job, "eval", progress=False))
  teacher, cfg = hf.load_model(path)
  freq = compress.routing_frequency(teacher, reader)
  assert set(freq) == set(cfg.moe_layers)
  n_tokens = int((np.asarray(reader.read_rows(np.arange(reader.rows))["segment_ids"]) > 0).sum())
  for f in freq.values():
    assert f.sum() == n_tokens * cfg.num_experts_per_tok
  full = min(cfg.hidden_size, cfg.moe_intermediate_size)
  student, _ = compress.compress_model(teacher, Compression(full, full, full, "routing_weighted"),
                                       freq)
  w = np.asarray(hf.state_arrays(teacher)[("layers", 0, "mlp", "experts", "up_proj")])
  core = np.asarray(hf.state_arrays(student)[("layers", 0, "mlp", "experts", "shared_core",
                                                "up")])
  np.testing.assert_allclose(core, np.einsum("e,eio->io", freq[0] / freq[0].sum(), w), atol=1e-6)
  np.testing.assert_allclose(student(_tokens(cfg))[0], teacher(_tokens(cfg))[0], atol=1e-4)


def test_sharded_compress_equals_one_device(tmp_path):
  """compress on 8 forced CPU devices (fsdp, data x fsdp x expert, fsdp x expert x tensor
  meshes; 8 experts so the SVDs spread one expert per device) equals the one-device compress,
  and the student comes out sharded; so does the routing frequency a weighted core uses."""
  import json
  import pathlib
  from conftest import make_hf_checkpoint
  make_hf_checkpoint(tmp_path / "teacher", num_experts=8)
  script = pathlib.Path(__file__).parent / "sharded_compress_check.py"
  r = subprocess.run([sys.executable, str(script), str(tmp_path / "teacher")],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(out) == 3
  for mesh, o in out.items():
    assert o["keys_equal"] and o["devices"] == 8, (mesh, o)
    # The mean over sharded experts sums in another order (~1e-7 relative); a rank-r
    # truncation amplifies that by 1 / (gap between singular values r and r+1), measured
    # ~1e-5 here. The reconstruction errors agree to 1e-7.
    assert o["report_diff"] < 1e-6, (mesh, o)
    assert o["merged_rel_diff"] < 1e-4 and o["factors_rel_diff"] < 1e-4, (mesh, o)
    assert o["min_shards"] >= 2, (mesh, o)  # every expert param split, none replicated
    # routing frequency on the mesh (each process its share of the rows) == one device
    assert o["freq_total"] == o["freq_expected"] and o["freq_max_diff"] == 0, (mesh, o)
