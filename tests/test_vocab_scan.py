"""Chunked top-k and logsumexp equal the dense computation on the full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.vocab_scan import topk_lse


@pytest.mark.parametrize("chunk", [7, 16, 50, 64])
def test_chunked_topk_lse_equals_dense(chunk):
  r = np.random.RandomState(0)
  h = jnp.asarray(r.randn(23, 12), jnp.float32)
  w = jnp.asarray(r.randn(12, 50), jnp.float32)
  temps = (1.0, 2.0, 0.5)
  top_v, top_i, lse = jax.jit(lambda h, w: topk_lse(h, w, 9, temps, chunk))(h, w)
  z = np.asarray(h @ w)
  ref_v, ref_i = jax.lax.top_k(z, 9)
  np.testing.assert_array_equal(top_i, ref_i)
  np.testing.assert_allclose(top_v, ref_v, rtol=1e-6, atol=1e-6)
  for j, t in enumerate(temps):
    np.testing.assert_allclose(lse[:, j], jax.nn.logsumexp(z / t, axis=-1), rtol=1e-6)


def test_ties_go_to_lower_id_like_dense():
  h = jnp.ones((2, 3), jnp.float32)
  w = jnp.zeros((3, 20), jnp.float32).at[:, 17].set(1.0)
  _, top_i, _ = topk_lse(h, w, 4, (1.0,), chunk=6)
  np.testing.assert_array_equal(top_i, [[17, 0, 1, 2]] * 2)


def test_k_larger_than_chunk():
  r = np.random.RandomState(1)
  h, w = jnp.asarray(r.randn(5, 4)), jnp.asarray(r.randn(4, 30))
  top_v, top_i, _ = topk_lse(h, w, 12, (1.0,), chunk=5)
  ref_v, ref_i = jax.lax.top_k(h @ w, 12)
  np.testing.assert_array_equal(top_i, ref_i)
