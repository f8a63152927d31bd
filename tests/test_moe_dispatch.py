"""ragged and capacity backends agree when nothing is dropped; low capacity reports drops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moedistill.model import moe, tiny
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM


def _expert_inputs(t=40, d=8, f=6, e=5, k=2, seed=0):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(t, d), jnp.float32)
  w = [jnp.asarray(r.randn(*s) * 0.3, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
  _, weights, experts = moe.route(x, jnp.asarray(r.randn(d, e), jnp.float32), k, True)
  return x, w, weights, experts


def _dense_reference(x, w, weights, experts):
  """Plain per-token loop over chosen experts."""
  g, u, dn = (np.asarray(a) for a in w)
  out = np.zeros_like(np.asarray(x))
  for t in range(x.shape[0]):
    for j in range(experts.shape[1]):
      e = int(experts[t, j])
      h = np.asarray(jax.nn.silu(x[t] @ g[e])) * (np.asarray(x[t]) @ u[e])
      out[t] += float(weights[t, j]) * (h @ dn[e])
  return out


@pytest.mark.parametrize("backend,factor", [("ragged", 1.0), ("capacity", 10.0)])
def test_backends_equal_dense_reference(backend, factor):
  x, w, weights, experts = _expert_inputs()
  d = moe.make_dispatch(backend, experts, weights, 5, factor)
  y = moe.expert_ffn(d, x, *w)
  np.testing.assert_allclose(np.asarray(y), _dense_reference(x, w, weights, experts), atol=1e-5)
  assert int(d.dropped) == 0


def test_low_capacity_drops_and_counts():
  x, w, weights, experts = _expert_inputs()
  d = moe.make_dispatch("capacity", experts, weights, 5, 0.5)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=5)
  cap = int(np.ceil(experts.size / 5 * 0.5))
  assert int(d.dropped) == int(np.maximum(counts - cap, 0).sum()) > 0
  # Every kept copy still computes exactly; dropped copies contribute nothing.
  y = np.asarray(moe.expert_ffn(d, x, *w))
  assert np.isfinite(y).all()


def test_model_backends_agree():
  cfg = tiny()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))
  outs = {}
  for backend, factor in (("ragged", 1.25), ("capacity", 8.0), ("capacity", 0.25)):
    m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0),
                            runtime=Runtime(moe_backend=backend, capacity_factor=factor))
    outs[(backend, factor)] = jax.jit(lambda t, m=m: m(t))(tokens)
  np.testing.assert_allclose(outs[("ragged", 1.25)][0], outs[("capacity", 8.0)][0], atol=1e-5)
  assert int(outs[("capacity", 8.0)][1]["dropped"]) == 0
  assert int(outs[("capacity", 0.25)][1]["dropped"]) > 0
