"""The fused full-vocab divergences (training/online_teacher.py) against float64 NumPy: values
from dense softmaxes, gradients from central differences of that NumPy divergence (not from
the formulas the custom VJP uses), chained through h @ W. Chunks that do not divide the
vocabulary (a tail slice), masked tokens, teacher and student of different hidden sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.training.online_teacher import divergence, full_vocab_kl, generalized_jsd


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_div(zs, zt, T, beta):
  """Per-token generalised JSD in float64 from dense [n, v] logits (TRL's convention)."""
  logq, logp = np_log_softmax(zs / T), np_log_softmax(zt / T)
  p, q = np.exp(logp), np.exp(logq)
  if beta == 0:
    return (p * (logp - logq)).sum(-1)
  if beta == 1:
    return (q * (logq - logp)).sum(-1)
  logm = np.log(beta * p + (1 - beta) * q)
  return beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)


def np_grad_logits(zs, zt, T, beta, ct, eps=1e-6):
  """d sum(ct * D) / d zs by central differences (float64)."""
  g = np.zeros_like(zs)
  for i in range(zs.shape[0]):
    for j in range(zs.shape[1]):
      up, dn = zs.copy(), zs.copy()
      up[i, j] += eps
      dn[i, j] -= eps
      g[i, j] = ct[i] * (np_div(up[i:i + 1], zt[i:i + 1], T, beta)[0]
                         - np_div(dn[i:i + 1], zt[i:i + 1], T, beta)[0]) / (2 * eps)
  return g


def case(n=7, d=8, e=12, v=37, scale=1.0, seed=0):
  r = np.random.RandomState(seed)
  hs, ws = r.randn(n, d), r.randn(d, v) * scale / np.sqrt(d)
  ht, wt = r.randn(n, e), r.randn(e, v) * scale / np.sqrt(e)
  return hs, ws, ht, wt


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk", [8, 37, 64])
def test_divergence_and_gradient_match_float64(beta, chunk):
  hs, ws, ht, wt = case(scale=3.0)
  T = 1.7
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  out = divergence(f32(hs), f32(ws), f32(ht), f32(wt), T, chunk, beta)
  zs, zt = hs @ ws, ht @ wt
  ref = np_div(zs, zt, T, beta)
  np.testing.assert_allclose(np.asarray(out["div"]), ref, rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["teacher_argmax"]), zt.argmax(-1))

  ct = np.random.RandomState(1).rand(hs.shape[0]) + 0.5
  loss = lambda a, b: jnp.sum(f32(ct) * divergence(a, b, f32(ht), f32(wt), T, chunk,  # noqa
                                                   beta)["div"])
  dh, dw = jax.grad(loss, argnums=(0, 1))(f32(hs), f32(ws))
  g = np_grad_logits(zs, zt, T, beta, ct)
  np.testing.assert_allclose(np.asarray(dh), g @ ws.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dw), hs.T @ g, rtol=1e-4, atol=1e-6)
  # the teacher is frozen: no gradient reaches it
  dt = jax.grad(lambda a: jnp.sum(divergence(f32(hs), f32(ws), a, f32(wt), T, chunk,
                                             beta)["div"]))(f32(ht))
  assert not np.any(np.asarray(dt))


def test_full_vocab_kl_masks_and_large_logits():
  """Logits of magnitude ~30 (no overflow: online logsumexps), masked tokens give 0 and no
  gradient, and identical models give KL 0."""
  hs, ws, ht, wt = case(n=9, v=50, scale=30.0, seed=3)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0], bool)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  kl = full_vocab_kl(f32(hs), f32(ws), f32(ht), f32(wt), mask, 2.0, 16)
  ref = np_div(hs @ ws, ht @ wt, 2.0, 0) * mask
  np.testing.assert_allclose(np.asarray(kl), ref, rtol=2e-5, atol=1e-5)
  dh = jax.grad(lambda a: jnp.sum(full_vocab_kl(a, f32(ws), f32(ht), f32(wt), mask, 2.0,
                                                16)))(f32(hs))
  assert not np.any(np.asarray(dh)[~mask]) and np.all(np.any(np.asarray(dh)[mask], -1))
  same = full_vocab_kl(f32(hs), f32(ws), f32(hs), f32(ws), mask, 1.0, 16)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=2e-5)
  with pytest.raises(ValueError, match="beta"):
    generalized_jsd(f32(hs), f32(ws), f32(ht), f32(wt), mask, 1.0, 16, beta=1.5)


def test_no_tokens_by_vocab_array_in_the_program():
  """The compiled forward and backward hold no [n, v] buffer: n=64 tokens, v=4096, chunk 128,
  so such a buffer (1 MiB in f32) would dwarf the temporaries of [n, chunk] slices."""
  n, d, v, c = 64, 16, 4096, 128
  hs, ws, ht, wt = (jax.ShapeDtypeStruct(s, jnp.float32)
                    for s in ((n, d), (d, v), (n, d), (d, v)))
  mask = jax.ShapeDtypeStruct((n,), jnp.bool_)
  fwd_bwd = jax.jit(jax.grad(lambda a, b, x, y, m: jnp.sum(full_vocab_kl(a, b, x, y, m, 1.0, c)),
                             argnums=(0, 1)))
  temp = fwd_bwd.lower(hs, ws, ht, wt, mask).compile().memory_analysis().temp_size_in_bytes
  assert temp < n * v * 4 / 2, temp
