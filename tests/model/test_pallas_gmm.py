"""The Pallas grouped matmul (moe_backend=pallas, model/pallas_gmm.py) in interpret mode on CPU:
the very kernel code the Triton lowering compiles for a GPU, checked against dense per-copy
references computed in float64 NumPy, in value and in both gradients (dx, dW):
  - the kernel alone on a hand-made tile layout (empty experts, padding tiles, odd K and N);
  - the whole `pallas` dispatch (expand -> gmm -> combine) on routed tokens: 17 tokens, rank-4
    contractions and outputs, top-1 and top-8, experts that get no copies, f32 and bf16;
  - whole models (dense experts, and a rank-4 shared-core student) equal `sorted` in logits and
    in the gradient of a loss;
  - the kernels lower for CUDA through the Triton lowering from this CPU-only machine.
float32 tolerances: the kernel accumulates in float32 over at most a few dozen terms of O(1)
magnitude, so errors are ~1e-6 relative to the output scale; 1e-5 leaves room and no more.
"""
import dataclasses
import os
import pathlib
import subprocess
import sys

if __name__ == "__main__":  # only as a script: an import must not leak 8 devices to others
  flags = os.environ.get("XLA_FLAGS", "")  # the suite's, see conftest
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moedistill.model import moe, pallas_gmm, tiny
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import Compression

F32_TOL = 1e-5
# bf16: operands are exactly representable products in the float32 accumulator; the result is
# rounded once to bf16 (relative error <= 2^-9), and through the dispatch the router-weighted
# sum of k copies is rounded again; 2^-7 of the output scale bounds both.
BF16_TOL = 2.0 ** -7


def _close(got, want, tol):
  """|got - want| <= tol * max|want| elementwise (the output's scale: sums of signed terms
  may cancel to near zero, where a per-element relative bound means nothing)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.max(np.abs(got - want))
  assert err <= tol * max(np.max(np.abs(want)), 1e-30), (err, np.max(np.abs(want)))


def test_kernel_equals_per_tile_products_value_and_grads():
  """Tiles of 16 rows: experts [0, 0, 2, 4, 4, 4] then 2 padding tiles (live = 6); experts 1
  and 3 have no tiles; K=5 and N=3 pad to one block of 16. Rows of padding tiles read as zero
  outputs and get zero dx."""
  r = np.random.RandomState(0)
  te = np.array([0, 0, 2, 4, 4, 4, 4, 4], np.int32)
  live, tm, e, k, f = 6, 16, 5, 5, 3
  x = r.randn(len(te) * tm, k).astype(np.float32)
  w = r.randn(e, k, f).astype(np.float32)
  dy = r.randn(len(te) * tm, f).astype(np.float32)
  y_ref, dx_ref, dw_ref = np.zeros((len(te) * tm, f)), np.zeros(x.shape), np.zeros(w.shape)
  x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
  for i, ei in enumerate(te[:live]):
    s = slice(i * tm, (i + 1) * tm)
    y_ref[s] = x64[s] @ w64[ei]
    dx_ref[s] = dy64[s] @ w64[ei].T
    dw_ref[ei] += x64[s].T @ dy64[s]
  f_ = jax.jit(lambda x, w: jax.vjp(lambda x, w: pallas_gmm.gmm(x, w, te, live), x, w))
  y, vjp = f_(x, w)
  dx, dw = vjp(dy)
  _close(y, y_ref, F32_TOL)
  _close(dx, dx_ref, F32_TOL)
  _close(dw, dw_ref, F32_TOL)
  assert not np.any(np.asarray(y)[live * tm:]) and not np.any(np.asarray(dx)[live * tm:])
  assert not np.any(np.asarray(dw)[[1, 3]])  # experts without tiles: exactly zero


def _routing(r, t, k, e, empty):
  """[t, k] distinct experts per token drawn from those not in `empty`, router weights."""
  allowed = np.array([i for i in range(e) if i not in empty])
  experts = np.stack([r.choice(allowed, k, replace=False) for _ in range(t)]).astype(np.int32)
  weights = r.rand(t, k).astype(np.float32) + 0.1
  return experts, weights / weights.sum(1, keepdims=True)


def _dense_reference(x, w, experts, weights, ct):
  """y[t] = sum_j weights[t, j] * x[t] @ w[experts[t, j]], and d(sum y * ct)/d(x, w), float64."""
  x, w, weights, ct = (np.asarray(a, np.float64) for a in (x, w, weights, ct))
  y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros(x.shape), np.zeros(w.shape)
  for t in range(x.shape[0]):
    for j, ei in enumerate(experts[t]):
      y[t] += weights[t, j] * (x[t] @ w[ei])
      dx[t] += weights[t, j] * (w[ei] @ ct[t])
      dw[ei] += weights[t, j] * np.outer(x[t], ct[t])
  return y, dx, dw


@pytest.mark.parametrize("t,k,e,d,f,empty,dtype", [
    (17, 1, 8, 4, 24, (0, 7), jnp.float32),     # top-1, rank-4 contraction (K=4), last expert empty
    (17, 8, 11, 20, 4, (3,), jnp.float32),      # top-8, rank-4 output (N=4)
    (17, 2, 6, 36, 70, (1, 2), jnp.float32),    # K and N past one block of 64, with remainders
    (17, 8, 11, 4, 20, (0,), jnp.bfloat16),     # bf16, top-8, K=4
])
def test_dispatch_equals_dense_per_token_reference(t, k, e, d, f, empty, dtype):
  r = np.random.RandomState(t * k + e)
  experts, weights = _routing(r, t, k, e, empty)
  x = jnp.asarray(r.randn(t, d), dtype)
  w = jnp.asarray(r.randn(e, d, f), dtype)
  ct = jnp.asarray(r.randn(t, f), dtype)

  def layer(x, w):
    disp = moe.make_dispatch("pallas", jnp.asarray(experts), jnp.asarray(weights), e)
    return disp.combine(disp.gmm(disp.expand(x), w))

  y, vjp = jax.jit(lambda x, w: jax.vjp(layer, x, w))(x, w)
  dx, dw = vjp(ct)
  assert y.dtype == dx.dtype == dw.dtype == dtype
  y_ref, dx_ref, dw_ref = _dense_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                           experts, weights, ct.astype(jnp.float32))
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  _close(y, y_ref, tol)
  _close(dx, dx_ref, tol)
  _close(dw, dw_ref, tol)
  assert not np.any(np.asarray(dw, np.float32)[list(empty)])


def test_row_tiles_are_triton_sized():
  assert [pallas_gmm.row_tile(m, 8) for m in (8, 17, 136, 512, 10 ** 6)] == [16, 16, 16, 64, 64]
  assert [pallas_gmm.block_for(n) for n in (4, 16, 20, 64, 768)] == [16, 16, 32, 64, 64]
  with pytest.raises(ValueError, match="power of two"):
    pallas_gmm.gmm(jnp.zeros((24, 4)), jnp.zeros((2, 4, 4)), jnp.zeros((3,), jnp.int32), 3)


def _value_and_grad(cfg, backend, tokens, compression=None):
  m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime(moe_backend=backend),
                          compression=compression)
  if compression is not None:  # the wrappers' B start at zero: give them values
    for layer in m.layers:
      wr = getattr(getattr(layer.mlp, "experts", None), "wrapper", None)
      for p in ("gate", "up", "down") if wr is not None else ():
        b = getattr(wr, f"{p}_b")
        b[...] = 0.3 * jnp.sin(jnp.arange(b[...].size, dtype=jnp.float32)).reshape(b.shape)
  g, st = nnx.split(m)

  def loss(st):
    logits = nnx.merge(g, st)(tokens)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
  return logits, grads


@pytest.mark.parametrize("compression", [None, Compression(4, 4, 4)], ids=["dense", "rank4"])
def test_model_pallas_equals_sorted(compression):
  # One MoE layer and one dense layer: each MoE layer adds its kernels' interpret-mode compiles.
  cfg = dataclasses.replace(tiny(), num_hidden_layers=2, mlp_only_layers=(1,))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)))
  lp, gp = _value_and_grad(cfg, "pallas", tokens, compression)
  ls, gs = _value_and_grad(cfg, "sorted", tokens, compression)
  _close(lp, ls, F32_TOL)
  leaves_p, leaves_s = jax.tree.leaves(gp), jax.tree.leaves(gs)
  assert len(leaves_p) == len(leaves_s)
  for a, b in zip(leaves_p, leaves_s):
    _close(a, b, F32_TOL)


@pytest.mark.parametrize("m,e,k,f", [
    (60, 4, 4, 20),             # rank 4, one padded block each way
    (16384 * 8, 128, 2048, 1536),  # Qwen3-30B-A3B gate+up at 16k tokens, top-8
    (16384 * 8, 128, 768, 2048),   # and down
])
def test_kernels_lower_for_cuda_through_triton(m, e, k, f):
  """Forward, dx and dW kernels go through Pallas' Triton lowering (its power-of-two and dot
  size rules) into Triton custom calls, without a GPU (abstract operands: nothing allocated)."""
  tm = pallas_gmm.row_tile(m, e)
  n = m // tm + e
  te = jnp.zeros((n,), jnp.int32)
  x = jax.ShapeDtypeStruct((n * tm, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((e, k, f), jnp.float32)
  f_ = lambda x, w: jnp.sum(pallas_gmm.gmm(x, w, te, jnp.int32(3)).astype(jnp.float32))  # noqa
  with pallas_gmm.triton_lowering():
    text = jax.jit(jax.value_and_grad(f_, (0, 1))).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3
  for name in ("gmm", "gmm_dx", "gmm_dw"):
    assert f'name = "{name}"' in text


def test_expert_parallel_refuses_pallas_in_interpret_mode():
  """Under a mesh the MoE block runs in shard_map, where jax 0.10.2's Pallas interpreter cannot
  run: refused with one line before anything is traced (on a GPU the Triton path is used)."""
  from moedistill import sharding
  from moedistill.errors import ConfigError
  from moedistill.model import expert_parallel
  from moedistill.model.qwen3_moe import DenseExperts, MoeBlock
  cfg = tiny()
  rt = Runtime(moe_backend="pallas")
  block = MoeBlock(cfg, rt, nnx.Rngs(0), DenseExperts(cfg, rt, nnx.Rngs(0)))
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1, 1))
  with pytest.raises(ConfigError, match="moe_backend='pallas' with a mesh"):
    expert_parallel.moe_block(mesh, block, jnp.zeros((1, 4, cfg.hidden_size)))


def _lower_expert_parallel_for_cuda() -> int:
  """Child process (8 forced CPU devices): a shared-core MoE block's loss and gradients under
  expert parallelism (mesh data, fsdp, expert, tensor = 1, 1, 4, 2) lowered for CUDA with the
  Triton kernels; returns the number of Triton calls."""
  from moedistill import sharding
  from moedistill.model.qwen3_moe import MoeBlock
  from moedistill.model.shared_core import SharedCoreExperts
  cfg = dataclasses.replace(tiny(), num_experts=8, num_experts_per_tok=3)
  rt = Runtime(moe_backend="pallas")
  block = MoeBlock(cfg, rt, nnx.Rngs(0), SharedCoreExperts(cfg, Compression(4, 4, 4), rt,
                                                           nnx.Rngs(0)))
  g, st = nnx.split(block)
  x = jnp.zeros((8, 6, cfg.hidden_size), jnp.float32)
  f = lambda st, x: jnp.sum(nnx.merge(g, st)(x)[0])  # noqa: E731
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 4, 2))
  with jax.set_mesh(mesh), pallas_gmm.triton_lowering():
    text = jax.jit(jax.value_and_grad(f, (0, 1))).trace(st, x).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "all_to_all" in text  # tokens really travel between expert shards
  return text.count("__gpu$xla.gpu.triton")


def test_expert_parallel_lowers_for_cuda():
  """Under shard_map the kernels' operands and outputs carry the manual axes' types: the
  expert-parallel block lowers for CUDA (6 grouped matmuls forward, 2 kernels each backward)."""
  r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2])))
  assert r.returncode == 0, r.stderr[-4000:]
  assert r.stdout.strip().splitlines()[-1] == "18"


if __name__ == "__main__":
  print(_lower_expert_parallel_for_cuda())
