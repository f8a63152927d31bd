"""`auto` resolution as a pure function of (platform, device kind, grouped-matmul shapes), the
platform checks at config time and the target override that cross-lowering uses. No devices:
every case names its device kind."""
import dataclasses
import logging as pylogging

import pytest

from moedistill.errors import ConfigError
from moedistill.model import moe
from moedistill.model import resolve as R
from moedistill.model.config import ModelConfig
from moedistill.model.layers import Runtime
from moedistill.model.shared_core import Compression

QWEN3_30B = ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                        num_key_value_heads=4, head_dim=128, num_experts=128,
                        num_experts_per_tok=8)
DEMO = dataclasses.replace(QWEN3_30B, vocab_size=256, hidden_size=64, moe_intermediate_size=64,
                           num_experts=8, num_experts_per_tok=2)  # the tiny teacher's shapes
TEACHER = R.gmm_shapes(QWEN3_30B)
STUDENT_128 = R.gmm_shapes(QWEN3_30B, Compression(128, 128, 128))
STUDENT_4 = R.gmm_shapes(QWEN3_30B, Compression(4, 4, 4))  # the demo's rank

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
A100, L4, V5E = "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "TPU v5 lite"

# (platform, device kind, shapes) -> (moe_backend, attention). `auto` attention: plain up to
# attention_block positions, blocked beyond (decided per call from the row length).
TABLE = [
    ("cuda", H100, TEACHER, "mgpu", "pallas"),
    ("cuda", H100, STUDENT_128, "mgpu", "pallas"),
    ("cuda", H100, STUDENT_4, "pallas", "pallas"),
    ("cuda", H100, None, "pallas", "pallas"),
    ("cuda", H200, TEACHER, "mgpu", "pallas"),
    ("cuda", H200, STUDENT_4, "pallas", "pallas"),
    ("cuda", H200, R.gmm_shapes(DEMO), "pallas", "pallas"),
    ("cuda", A100, TEACHER, "pallas", "pallas"),
    ("cuda", A100, STUDENT_4, "pallas", "pallas"),
    ("cuda", L4, TEACHER, "pallas", "pallas"),
    ("cuda", L4, STUDENT_4, "pallas", "pallas"),
    ("cuda", "Tesla V100-SXM2-16GB", TEACHER, "ragged", "auto"),
    ("tpu", V5E, TEACHER, "ragged", "auto"),
    ("tpu", V5E, STUDENT_4, "ragged", "auto"),
    ("cpu", "cpu", TEACHER, "sorted", "auto"),
    ("cpu", "cpu", STUDENT_4, "sorted", "auto"),
]


@pytest.mark.parametrize("platform,kind,shapes,backend,attn", TABLE)
def test_resolution_table(platform, kind, shapes, backend, attn):
  r = R.resolve(platform, kind, shapes)
  assert (r.moe_backend, r.attention) == (backend, attn)
  # Never a dropping backend, never cuDNN (dense [b, 1, t, t] mask with segment ids).
  assert r.moe_backend != "capacity" and r.attention != "cudnn"


def test_why_names_the_matmul_that_does_not_fit_mgpu():
  r = R.resolve("cuda", H100, STUDENT_4)
  # The rank-4 wrapper's A contracts d=2048 (fine) into N=4: not a multiple of block_n=128.
  assert r.why == ("moe_backend=auto on NVIDIA H100 80GB HBM3: pallas, not mgpu, because "
                   "wrapper gate_a [2048 -> 4]: N=4 is not a multiple of the Mosaic GPU forward "
                   "block_n=128")
  assert R.resolve("cuda", H100, TEACHER).why is None
  assert R.resolve("cuda", A100, TEACHER).why is None


def test_mgpu_only_for_16_bit_compute():
  # Hopper's wgmma takes float32 operands as tf32: not exact for a float32 model.
  r = R.resolve("cuda", H100, TEACHER, "float32")
  assert r.moe_backend == "pallas" and "float32 compute" in r.why
  assert R.resolve("cuda", H100, TEACHER, "float16").moe_backend == "mgpu"
  with R.targeting(R.Target("cuda", H100)):
    import jax.numpy as jnp
    assert moe.resolve_runtime(Runtime(dtype=jnp.float32), QWEN3_30B).moe_backend == "pallas"
    assert moe.resolve_runtime(Runtime(dtype=jnp.bfloat16), QWEN3_30B).moe_backend == "mgpu"


def test_mgpu_constraints_per_dimension():
  # Each dimension fails on its own: K (contracting, forward block_k=64 and dW block_m=64,
  # dx block_n=128) and N (forward block_n=128).
  assert R.mgpu_misfit((("m", 128, 128),)) is None
  assert "K=64 is not a multiple of the Mosaic GPU dx block_n=128" in R.mgpu_misfit(
      (("m", 64, 128),))
  assert "K=96 is not a multiple of the Mosaic GPU forward block_k=64" in R.mgpu_misfit(
      (("m", 96, 128),))
  assert "N=192 is not a multiple" not in (R.mgpu_misfit((("m", 128, 256),)) or "")
  assert "N=192" in R.mgpu_misfit((("m", 128, 192),))
  # The last of several shapes is checked too.
  assert R.mgpu_misfit((("a", 128, 128), ("b", 4, 128))).startswith("b [4 -> 128]")


def test_gmm_shapes_teacher_and_student():
  assert TEACHER == (("experts gate_up", 2048, 1536), ("experts down", 768, 2048))
  assert R.gmm_shapes(QWEN3_30B, Compression(8, 16, 32)) == (
      ("wrapper gate_a", 2048, 8), ("wrapper gate_b", 8, 768),
      ("wrapper up_a", 2048, 16), ("wrapper up_b", 16, 768),
      ("wrapper down_a", 768, 32), ("wrapper down_b", 32, 2048))


@pytest.mark.parametrize("kind,hopper,ampere", [
    (H100, True, True), (H200, True, True), ("NVIDIA GH200 480GB", True, True),
    ("NVIDIA H20", True, True), (A100, False, True), (L4, False, True),
    ("NVIDIA GeForce RTX 4090", False, True), ("Tesla T4", False, False),
    ("Tesla V100-SXM2-16GB", False, False)])
def test_device_kinds(kind, hopper, ampere):
  assert R.is_hopper(kind) == hopper and R.is_ampere_or_newer(kind) == ampere


def test_unsupported_per_platform():
  runs = lambda f, v, p, k: R.unsupported(f, v, p, k) is None  # noqa: E731
  assert runs("moe_backend", "mgpu", "cuda", H100)
  assert not runs("moe_backend", "mgpu", "cuda", A100)
  assert not runs("moe_backend", "mgpu", "cpu", "cpu")
  assert not runs("moe_backend", "mgpu", "tpu", V5E)
  assert runs("moe_backend", "pallas", "cuda", L4) and runs("moe_backend", "pallas", "cpu", "cpu")
  assert not runs("moe_backend", "pallas", "tpu", V5E)
  assert runs("attention", "cudnn", "cuda", A100)
  assert not runs("attention", "cudnn", "cpu", "cpu") and not runs("attention", "cudnn", "tpu", V5E)
  assert not runs("attention", "pallas", "tpu", V5E)
  for b in ("sorted", "ragged", "capacity", "ragged_vjp"):
    assert all(runs("moe_backend", b, p, k) for p, k in
               (("cpu", "cpu"), ("tpu", V5E), ("cuda", A100)))


def _job(tmp_path, **model):
  from conftest import job_config
  from moedistill.config import job_from_config
  c = job_config(tmp_path, tmp_path / "teacher")
  for k, v in model.items():
    c.model[k] = v
  return job_from_config(c)


@pytest.mark.parametrize("field,value", [("moe_backend", "mgpu"), ("attention", "cudnn"),
                                         ("moe_backend", "pallas")])
def test_config_refuses_what_the_target_cannot_run(tmp_path, field, value):
  with R.targeting(R.Target("tpu", V5E)):
    with pytest.raises(ConfigError) as e:
      _job(tmp_path, **{field: value})
  msg = str(e.value)
  assert msg.startswith(f"config.model.{field}={value!r}: needs an NVIDIA")
  assert "the target is tpu (TPU v5 lite); expected one of [" in msg and "\n" not in msg


def test_config_on_this_cpu_refuses_mgpu_and_cudnn_accepts_the_rest(tmp_path):
  for field, value in (("moe_backend", "mgpu"), ("attention", "cudnn")):
    with pytest.raises(ConfigError, match=rf"config.model.{field}='{value}': needs an NVIDIA"):
      _job(tmp_path, **{field: value})
  assert _job(tmp_path, moe_backend="pallas", attention="pallas").model.moe_backend == "pallas"


def test_config_for_a_cuda_target_accepts_mgpu_and_auto_dtype_is_bf16(tmp_path):
  import jax.numpy as jnp
  with R.targeting(R.Target("cuda", H100)):
    job = _job(tmp_path, moe_backend="mgpu", attention="cudnn", dtype="auto")
  assert (job.model.moe_backend, job.model.attention, job.model.dtype) == (
      "mgpu", "cudnn", jnp.bfloat16)
  assert _job(tmp_path, dtype="auto").model.dtype == jnp.float32  # this CPU host


def test_resolve_runtime_follows_the_target_and_logs_why_once(caplog):
  import jax.numpy as jnp
  comp = Compression(4, 4, 4)
  BF16 = Runtime(dtype=jnp.bfloat16)  # what dtype=auto gives on a GPU
  assert moe.resolve_runtime(BF16, DEMO, comp).moe_backend == "sorted"
  moe._LOGGED.clear()
  with caplog.at_level(pylogging.INFO), R.targeting(R.Target("cuda", H100)):
    rt = moe.resolve_runtime(BF16, QWEN3_30B, comp)
    assert (rt.moe_backend, rt.attention) == ("pallas", "pallas")
    moe.resolve_runtime(BF16, QWEN3_30B, comp)
    assert moe.resolve_runtime(BF16, QWEN3_30B).moe_backend == "mgpu"
    # Set explicitly: kept.
    rt = moe.resolve_runtime(Runtime(moe_backend="ragged", attention="blocked"),
                             QWEN3_30B)
    assert (rt.moe_backend, rt.attention) == ("ragged", "blocked")
  why = [r.getMessage() for r in caplog.records if "not mgpu" in r.getMessage()]
  assert why == [R.resolve("cuda", H100, STUDENT_4).why]
  assert moe.resolve_backend("auto") == "sorted"  # the override ended with the block


def test_drops():
  assert R.drops(Runtime(moe_backend="sorted")) is None
  assert "capacity_factor=1.25" in R.drops(Runtime(moe_backend="capacity"))
  assert R.drops(Runtime(moe_backend="sorted", ep_capacity_factor=1.5), expert_shards=1) is None
  assert "mesh.expert=2" in R.drops(Runtime(moe_backend="sorted", ep_capacity_factor=1.5), 2)
