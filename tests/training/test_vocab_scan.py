"""Chunked top-k and logsumexp equal the dense computation on the full logits: same ids
(ties to the lower id, as jax.lax.top_k), same values, logsumexp to float tolerance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.training.fused_stats import vocab_stats
from moedistill.training.vocab_scan import topk_lse


def _check_against_dense(h, w, k, temps, chunk, group):
  top_v, top_i, lse = jax.jit(lambda h, w: topk_lse(h, w, k, temps, chunk, group))(h, w)
  z = jnp.dot(h, w, preferred_element_type=jnp.float32)
  ref_v, ref_i = jax.lax.top_k(z, k)
  np.testing.assert_array_equal(top_i, ref_i)
  np.testing.assert_allclose(top_v, ref_v, rtol=1e-6, atol=1e-6)
  for j, t in enumerate(temps):
    np.testing.assert_allclose(lse[:, j], jax.nn.logsumexp(z / t, axis=-1), rtol=1e-6)


@pytest.mark.parametrize("chunk,group", [(7, 32), (16, 4), (50, 3), (64, 8), (12, 5)])
def test_chunked_topk_lse_equals_dense(chunk, group):
  r = np.random.RandomState(0)
  h = jnp.asarray(r.randn(23, 12), jnp.float32)
  w = jnp.asarray(r.randn(12, 50), jnp.float32)
  _check_against_dense(h, w, 9, (1.0, 2.0, 0.5), chunk, group)


@pytest.mark.parametrize("chunk,group", [(1000, 32), (4096, 32), (512, 7)])
def test_wide_vocab_k64(chunk, group):
  """Vocab not a multiple of the chunk or the group; k = 64 as the 30B-A3B preset."""
  r = np.random.RandomState(1)
  h = jnp.asarray(r.randn(40, 16), jnp.float32)
  w = jnp.asarray(r.randn(16, 5003), jnp.float32)
  _check_against_dense(h, w, 64, (1.0,), chunk, group)


def test_many_ties_keep_the_lower_id():
  """Logits on a coarse grid: most top-k entries tie, across groups and chunks."""
  r = np.random.RandomState(2)
  h = jnp.asarray(np.eye(8)[r.randint(0, 8, 30)], jnp.float32)
  w = jnp.asarray(r.randint(0, 4, (8, 300)), jnp.float32)
  _check_against_dense(h, w, 20, (1.0,), 64, 8)
  _check_against_dense(h, w, 20, (1.0,), 37, 5)


def test_ties_go_to_lower_id_like_dense():
  h = jnp.ones((2, 3), jnp.float32)
  w = jnp.zeros((3, 20), jnp.float32).at[:, 17].set(1.0)
  _, top_i, _ = topk_lse(h, w, 4, (1.0,), chunk=6)
  np.testing.assert_array_equal(top_i, [[17, 0, 1, 2]] * 2)


def test_k_larger_than_chunk_and_groups():
  r = np.random.RandomState(1)
  h, w = jnp.asarray(r.randn(5, 4)), jnp.asarray(r.randn(4, 30))
  _check_against_dense(h, w, 12, (1.0,), 5, 4)


def test_bf16_inputs():
  r = np.random.RandomState(3)
  h = jnp.asarray(r.randn(17, 16), jnp.bfloat16)
  w = jnp.asarray(r.randn(16, 700), jnp.bfloat16)
  _check_against_dense(h, w, 16, (1.0, 2.0), 256, 32)


@pytest.mark.parametrize("chunk", [8, 53, 100])
def test_fused_stats_argmax_is_the_first_dense_argmax(chunk):
  """vocab_stats' argmax (two-level, per chunk) on a coarse grid where rows have tied maxima."""
  r = np.random.RandomState(4)
  h = jnp.asarray(np.eye(6)[r.randint(0, 6, 25)], jnp.float32)
  w = jnp.asarray(r.randint(0, 3, (6, 230)), jnp.float32)
  idx, labels = jnp.zeros((25, 2), jnp.int32), jnp.zeros((25,), jnp.int32)
  got = vocab_stats(h, w, idx, labels, 2.0, chunk)["argmax"]
  np.testing.assert_array_equal(got, jnp.argmax(h @ w, axis=-1))
  h2 = jnp.asarray(r.randn(25, 6), jnp.float32)
  got = vocab_stats(h2, w, idx, labels, 2.0, chunk)["argmax"]
  np.testing.assert_array_equal(got, jnp.argmax(h2 @ w, axis=-1))


def test_fused_stats_bf16_gradient_close_to_float32():
  """bf16 inputs (the accelerator default; the backward's dots run in float32 on CPU)."""
  r = np.random.RandomState(5)
  h, w = jnp.asarray(r.randn(30, 16), jnp.float32), jnp.asarray(r.randn(16, 300) * 0.3)
  idx, labels = jnp.asarray(r.randint(0, 300, (30, 4))), jnp.asarray(r.randint(0, 300, (30,)))

  def f(h, w):
    s = vocab_stats(h, w, idx, labels, 2.0, 64)
    return jnp.sum(s["lse_t"]) + jnp.sum(s["lse_1"]) - jnp.sum(s["s_topk"]) - jnp.sum(s["s_label"])

  g32 = jax.grad(f, (0, 1))(h, w)
  g16 = jax.jit(jax.grad(f, (0, 1)))(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  for a, b in zip(g16, g32):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.03 * np.abs(b).max())
