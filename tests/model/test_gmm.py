"""The grouped-matmul custom VJP equals jax.lax.ragged_dot's autodiff (the kernel swapped for
the exact reference, as on CPU); gather-only permutations; the model with ragged_vjp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moedistill.model import gmm, moe, tiny
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM


@pytest.mark.parametrize("sizes", [(5, 0, 9, 3), (0, 0, 17, 0), (4, 4, 4, 5)])
def test_custom_vjp_equals_ragged_dot_autodiff(sizes):
  r = np.random.RandomState(0)
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(r.randn(sum(sizes), 6), jnp.float32)
  w = jnp.asarray(r.randn(len(sizes), 6, 7), jnp.float32)
  ct = jnp.asarray(r.randn(sum(sizes), 7), jnp.float32)
  f_ref = lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, gs) * ct)  # noqa: E731
  f_vjp = lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, gs, gmm.ReferenceKernel()) * ct)  # noqa
  np.testing.assert_allclose(f_vjp(x, w), f_ref(x, w), rtol=1e-6)
  for a, b in zip(jax.jit(jax.grad(f_vjp, (0, 1)))(x, w), jax.grad(f_ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_permute_rows_backward_is_inverse_gather():
  r = np.random.RandomState(1)
  perm = jnp.asarray(r.permutation(10))
  inv = jnp.argsort(perm)
  x, ct = jnp.asarray(r.randn(10, 3)), jnp.asarray(r.randn(10, 3))
  g1 = jax.grad(lambda x: jnp.sum(gmm.permute_rows(x, perm, inv) * ct))(x)
  g2 = jax.grad(lambda x: jnp.sum(x[perm] * ct))(x)
  np.testing.assert_allclose(g1, g2)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(gmm.permute_rows(x, perm, inv))))(x))
  assert "scatter" not in jaxpr


@pytest.mark.slow
def test_model_ragged_vjp_equals_ragged_in_value_and_grad():
  cfg = tiny()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)))
  out = {}
  for backend in ("ragged", "ragged_vjp"):
    m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime(moe_backend=backend))
    g, st = nnx.split(m)
    f = lambda st: jnp.sum(nnx.merge(g, st)(tokens)[0] ** 2)  # noqa: E731
    out[backend] = jax.value_and_grad(f)(st)
  np.testing.assert_allclose(out["ragged_vjp"][0], out["ragged"][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out["ragged_vjp"][1]), jax.tree.leaves(out["ragged"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_backend_on_cpu_is_sorted():
  assert moe.resolve_backend("auto") == "sorted" and not gmm.is_hopper()


def test_tiled_matmul_equals_per_tile_products_value_and_grad():
  r = np.random.RandomState(2)
  te = jnp.asarray([0, 0, 2, 3, 3, 3], jnp.int32)  # 6 tiles of 4 rows; expert 1 has none
  x, w = jnp.asarray(r.randn(24, 5), jnp.float32), jnp.asarray(r.randn(4, 5, 3), jnp.float32)
  ct = jnp.asarray(r.randn(24, 3), jnp.float32)

  def ref(x, w):
    return jnp.concatenate([x[4 * i:4 * i + 4] @ w[int(e)] for i, e in enumerate(te)])

  f = lambda fn: lambda x, w: jnp.sum(fn(x, w) * ct)  # noqa: E731
  np.testing.assert_allclose(gmm.tiled_matmul(x, w, te), ref(x, w), rtol=1e-6)
  for a, b in zip(jax.grad(f(lambda x, w: gmm.tiled_matmul(x, w, te)), (0, 1))(x, w),
                  jax.grad(f(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gather_rows_backward_is_a_gather():
  r = np.random.RandomState(3)
  idx = jnp.asarray([2, 0, 5, 2, 1, 5], jnp.int32)  # 5 is past the end of x: reads 0
  back = jnp.asarray([[1, 6], [4, 6], [0, 3]], jnp.int32)  # rows reading x[i]; 6: none
  x, ct = jnp.asarray(r.randn(3, 4)), jnp.asarray(r.randn(6, 4))
  y = gmm.gather_rows(x, idx, back)
  np.testing.assert_allclose(y, jnp.concatenate([x, jnp.zeros((1, 4))])[jnp.minimum(idx, 3)])
  g1 = jax.grad(lambda x: jnp.sum(gmm.gather_rows(x, idx, back) * ct))(x)
  g2 = jax.grad(lambda x: jnp.sum(x.at[idx].get(mode="fill", fill_value=0) * ct))(x)
  np.testing.assert_allclose(g1, g2)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(gmm.gather_rows(x, idx, back))))(x))
  assert "scatter" not in jaxpr


def test_mgpu_pads_rows_to_the_tile():
  k = gmm.MosaicGpuKernel()
  x, gs, pad = k._pad(jnp.ones((130, 4)), jnp.asarray([100, 30], jnp.int32), 128)
  assert x.shape[0] == 256 and pad == 126 and int(gs.sum()) == 256 and int(gs[-1]) == 156


def test_remat_full_gives_the_same_gradients():
  cfg = tiny()
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 7)))
  grads = []
  for remat in ("none", "full"):
    m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime(remat=remat))
    g, st = nnx.split(m)
    grads.append(jax.jit(jax.grad(lambda st: jnp.sum(nnx.merge(g, st)(tokens)[0] ** 2)))(st))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # recompute may fuse differently
