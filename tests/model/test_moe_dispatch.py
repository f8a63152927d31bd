"""Every dispatch backend equals a plain dense reference (each token through its k experts, by
per-token einsums over gathered expert weights) in value and gradient; low capacity drops and
counts; the sorted CPU path does work that scales with the routed copies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moedistill.model import moe, tiny
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import Compression


def _expert_inputs(t=40, d=8, f=6, e=7, k=3, seed=0, unused=0):
  """Routes among e - unused experts, renamed to spread the unused (empty) ones among the e."""
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(t, d), jnp.float32)
  w = [jnp.asarray(r.randn(*s) * 0.3, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
  router = jnp.asarray(r.randn(d, e - unused), jnp.float32)
  _, weights, experts = moe.route(x, router, k, True)
  return x, w, weights, jnp.asarray(r.permutation(e), jnp.int32)[experts]


def _dense_reference(x_td, w, weights_tk, experts_tk):
  """y_t = sum_j weight_tj * down_e(silu(gate_e x_t) * up_e x_t), e = experts_tk[t, j]."""
  g, u, dn = (a[experts_tk] for a in w)  # [t, k, ...]: each token's own expert matrices
  h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x_td, g)) * jnp.einsum("td,tkdf->tkf", x_td, u)
  return jnp.einsum("tkf,tkfd,tk->td", h, dn, weights_tk)


def _loop_reference(x, w, weights, experts):
  """The same, token by token in numpy (checks the einsum reference itself)."""
  g, u, dn = (np.asarray(a, np.float64) for a in w)
  xs = np.asarray(x, np.float64)
  out = np.zeros_like(xs)
  for t in range(xs.shape[0]):
    for j in range(experts.shape[1]):
      e = int(experts[t, j])
      a = xs[t] @ g[e]
      out[t] += float(weights[t, j]) * ((a / (1 + np.exp(-a))) * (xs[t] @ u[e])) @ dn[e]
  return out


def _value_and_grads(fn, x, w, weights):
  ct = jnp.asarray(np.random.RandomState(9).randn(*x.shape), jnp.float32)
  loss = lambda x, w, wt: jnp.sum(fn(x, w, wt) * ct)  # noqa: E731
  return fn(x, w, weights), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, weights)


def test_dense_reference_equals_per_token_loop():
  x, w, weights, experts = _expert_inputs()
  np.testing.assert_allclose(_dense_reference(x, w, weights, experts),
                             _loop_reference(x, w, weights, experts), atol=1e-5)


@pytest.mark.parametrize("backend,factor,unused", [
    ("sorted", 1.0, 0), ("sorted", 1.0, 3), ("ragged", 1.0, 0), ("ragged_vjp", 1.0, 3),
    ("capacity", 10.0, 0)])
def test_backend_equals_dense_reference_value_and_grad(backend, factor, unused):
  x, w, weights, experts = _expert_inputs(unused=unused)
  assert len(np.unique(np.asarray(experts))) == 7 - unused
  ref_y, ref_g = _value_and_grads(lambda x, w, wt: _dense_reference(x, w, wt, experts),
                                  x, w, weights)

  def ours(x, w, wt):
    return moe.expert_ffn(moe.make_dispatch(backend, experts, wt, 7, factor), x, *w)

  y, g = _value_and_grads(ours, x, w, weights)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(moe.make_dispatch(backend, experts, weights, 7, factor).dropped) == 0


@pytest.mark.parametrize("tile", [1, 3, 8, 64])
def test_sorted_any_tile_equals_dense_reference(tile):
  x, w, weights, experts = _expert_inputs(t=33, e=5, k=2, seed=2, unused=2)
  ref_y, ref_g = _value_and_grads(lambda x, w, wt: _dense_reference(x, w, wt, experts),
                                  x, w, weights)
  y, g = _value_and_grads(
      lambda x, w, wt: moe.expert_ffn(moe.SortedDispatch(experts, wt, 5, tile), x, *w),
      x, w, weights)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sorted_work_scales_with_copies_not_experts():
  """Compiled FLOPs of one grouped matmul at 8192 copies x 128 experts x 64 x 64: the sorted
  path stays within 2x the ideal 2*m*d*f (tile padding); ragged_dot on CPU is dense masked."""
  t, k, e, d, f = 1024, 8, 128, 64, 64
  experts = jax.random.randint(jax.random.key(0), (t, k), 0, e)
  x = jax.ShapeDtypeStruct((t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((e, d, f), jnp.float32)
  ideal = 2 * t * k * d * f

  def flops(backend):
    def fn(x, w):
      disp = moe.make_dispatch(backend, experts, jnp.ones((t, k)), e)
      return disp.gmm(disp.expand(x), w)
    cost = jax.jit(fn).lower(x, w).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  assert flops("sorted") < 2 * ideal
  assert flops("ragged") > 10 * ideal


def test_low_capacity_drops_and_counts():
  x, w, weights, experts = _expert_inputs()
  d = moe.make_dispatch("capacity", experts, weights, 7, 0.5)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=7)
  cap = int(np.ceil(experts.size / 7 * 0.5))
  assert int(d.dropped) == int(np.maximum(counts - cap, 0).sum()) > 0
  # Kept copies compute exactly as the reference restricted to them; dropped ones add nothing.
  kept = np.zeros(experts.shape, bool)
  slots = np.zeros(7, int)
  for j in range(experts.shape[1]):  # choice-major: first choices claim slots first
    for t in range(experts.shape[0]):
      e = int(experts[t, j])
      kept[t, j] = slots[e] < cap
      slots[e] += 1
  ref = _dense_reference(x, w, jnp.where(kept, weights, 0.0), experts)
  np.testing.assert_allclose(moe.expert_ffn(d, x, *w), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("compressed", [False, True])
def test_model_sorted_equals_ragged_value_and_grad(compressed):
  cfg = tiny()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))
  comp = Compression(rank_gate=3, rank_up=3, rank_down=3) if compressed else None
  out = {}
  for backend in ("ragged", "sorted"):
    m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime(moe_backend=backend),
                            compression=comp)
    g, st = nnx.split(m)
    f = lambda st: jnp.sum(nnx.merge(g, st)(tokens)[0] ** 2)  # noqa: E731
    out[backend] = jax.jit(jax.value_and_grad(f))(st)
  np.testing.assert_allclose(out["sorted"][0], out["ragged"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out["sorted"][1]), jax.tree.leaves(out["ragged"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_model_capacity_drops_when_low():
  cfg = tiny()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))
  outs = {}
  for factor in (8.0, 0.25):
    m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0),
                            runtime=Runtime(moe_backend="capacity", capacity_factor=factor))
    outs[factor] = jax.jit(lambda t, m=m: m(t))(tokens)
  assert int(outs[8.0][1]["dropped"]) == 0
  assert int(outs[0.25][1]["dropped"]) > 0
