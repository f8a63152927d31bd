"""Sampled teacher caches (cache.mode=sampled) and the packed top-k format (cache.format=packed).

The statistical test: on a vocab of 50, 4 positions, many independent N-draw caches from the
real device sampler, the mean of the sampled loss's gradient wrt the student logits equals the
full-vocab KD gradient (q - p) / T within 4 standard errors per coordinate, while a top-k
cache's gradient (renormalize mode, k=5) misses it by far more than that standard error.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.data import topk_codec as C
from moedistill.training import loss
from moedistill.training.vocab_sample import sample_ids
from moedistill.training.vocab_scan import topk_lse

V, POS, TRIALS = 50, 4, 2000


def _case(T):
  r = np.random.default_rng(0)
  t_logit = r.normal(0, 1.0, (POS, V))  # min p ~ 1e-3: every id drawn in 2000 x 8 draws
  s_logit = r.normal(0, 1.5, (POS, V))
  z = t_logit / T
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  zs = s_logit / T
  q = np.exp(zs - zs.max(1, keepdims=True))
  q /= q.sum(1, keepdims=True)
  return t_logit, s_logit, p, (q - p) / T  # full-vocab d KL(p || q) / d student logits


def _grads(s_logit, idx, logit, lse, T, mode):
  """Per-token gradient of the KD loss (alpha 1, without the T^2 factor) wrt student logits."""
  n, k = idx.shape
  s = jnp.asarray(np.tile(s_logit, (n // POS, 1)), jnp.float32)  # token = trial * POS + pos

  def f(s):
    stats = loss.dense_stats(s, jnp.asarray(idx), jnp.zeros(n, jnp.int32), T)
    kl, _, _ = loss.kl_terms(jnp.asarray(logit), jnp.asarray(lse), stats["s_topk"],
                             stats["lse_t"], T, mode)
    return jnp.sum(kl)

  return np.asarray(jax.grad(f)(s), np.float64).reshape(-1, POS, V)


def _draw(t_logit, T, N, exact_k, seed=1):
  """TRIALS independent caches of the 4 positions through the real sampler and decoder:
  the teacher 'forward' is h = logits, lm_head = identity."""
  h = jnp.asarray(np.tile(t_logit, (TRIALS, 1)), jnp.float32)  # token = trial * POS + pos
  w = jnp.eye(V, dtype=jnp.float32)
  top_v, top_i, lse = topk_lse(h, w, max(exact_k, 1), [T], chunk=16)
  u = np.random.default_rng(seed).random((TRIALS * POS, N))
  ex_i = top_i[:, :exact_k] if exact_k else None
  ex_v = top_v[:, :exact_k] if exact_k else None
  ids = np.asarray(sample_ids(h, w, jnp.asarray(u), lse[:, 0], T, 16, ex_i, ex_v))
  uniq, counts, _ = C.unique_counts(ids)
  shift = np.asarray(top_v[:, :1])  # the cache stores logits relative to the row max
  return C.sampled_targets(
      uniq, counts, T, None if ex_i is None else np.asarray(ex_i),
      None if ex_v is None else np.asarray(ex_v) - shift,
      np.asarray(lse[:, 0]) - shift[:, 0] / T)


@pytest.mark.parametrize("exact_k,T", [(0, 1.0), (3, 2.0)])
def test_sampled_gradient_is_unbiased_topk_is_not(exact_k, T):
  t_logit, s_logit, p, g_full = _case(T)
  idx, logit, lse = _draw(t_logit, T, N=8, exact_k=exact_k)
  g = _grads(s_logit, idx, logit, lse[:, 0], T, "sampled")
  mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(TRIALS)
  # The exact top ids' weights are p itself (no spread); every other id must vary across
  # draws, or the z-test below would say nothing about it.
  exact = se < 1e-7
  assert np.array_equal(exact.sum(1), np.full(POS, exact_k))
  assert np.abs(mean - g_full)[exact].max(initial=0) < 1e-5
  z = np.abs(mean - g_full)[~exact] / se[~exact]
  assert z.max() < 4.5, f"sampled gradient biased: max |z| = {z.max():.2f}"
  assert np.abs(mean - g_full).max() < 0.05 * np.abs(g_full).max()

  # The same case with a top-5 cache (renormalize): deterministic, so its gradient is its
  # own mean; it misses the full-vocab gradient by many of the sampled estimate's standard
  # errors (the test tells the two apart).
  k = 5
  order = np.argsort(-t_logit, axis=1)[:, :k]
  tl = np.take_along_axis(t_logit, order, axis=1)
  tl = tl - tl[:, :1]
  gk = _grads(s_logit, order, tl, np.zeros(POS), T, "renormalize")[0]
  zk = np.abs(gk - g_full)[~exact] / se[~exact]
  assert zk.max() > 30, f"top-k gradient unexpectedly close: max |z| = {zk.max():.2f}"


def test_sampler_frequencies_match_teacher():
  """The device sampler alone: id frequencies over all draws equal p within 4 sigma."""
  t_logit, _, p, _ = _case(1.0)
  h = jnp.asarray(np.tile(t_logit, (TRIALS, 1)), jnp.float32)
  _, _, lse = topk_lse(h, jnp.eye(V), 1, [1.0], chunk=16)
  u = np.random.default_rng(3).random((TRIALS * POS, 4))
  ids = np.asarray(sample_ids(h, jnp.eye(V), jnp.asarray(u), lse[:, 0], 1.0, 16))
  ids = ids.reshape(TRIALS, POS, 4).swapaxes(0, 1).reshape(POS, -1)
  n = ids.shape[1]
  freq = np.stack([np.bincount(ids[i], minlength=V) / n for i in range(POS)])
  sd = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(freq - p) < 4 * sd + 1e-12)
