"""KD loss: reference equals an independent NumPy implementation; the fused vocab-chunked
path equals the reference in value and gradient for all modes; router aux equals transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.training import loss
from moedistill.training.fused_stats import vocab_stats


def _np_logsumexp(x, axis=-1):
  m = x.max(axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


def numpy_kd(s, t_idx, t_logit, t_lse, labels, mask, alpha, T, mode):
  """Straight from the definitions, float64, one token at a time."""
  total = ce_sum = kl_sum = 0.0
  for n in range(s.shape[0]):
    if not mask[n]:
      continue
    z = s[n].astype(np.float64)
    ce = _np_logsumexp(z) - z[labels[n]]
    zt = t_logit[n].astype(np.float64) / T
    zs = z[t_idx[n]] / T
    s_lse = _np_logsumexp(z / T)
    if mode == "bucket":
      p, q = np.exp(zt - t_lse[n]), np.exp(zs - s_lse)
      p = np.append(p, 1 - p.sum())
      q = np.append(q, 1 - q.sum())
    elif mode == "renormalize":
      p, q = np.exp(zt - _np_logsumexp(zt)), np.exp(zs - _np_logsumexp(zs))
    else:
      p, q = np.exp(zt - _np_logsumexp(zt)), np.exp(zs - s_lse)
    kl = sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q) if pi > 0)
    total += (1 - alpha) * ce + alpha * T * T * kl
    ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
  c = mask.sum()
  return total / c, ce_sum / c, kl_sum / c


def make_batch(n=37, v=53, d=11, k=6, seed=0, T=2.0):
  r = np.random.RandomState(seed)
  h = r.randn(n, d).astype(np.float32)
  w = (r.randn(d, v) * 0.7).astype(np.float32)
  teacher = (r.randn(n, v) * 2).astype(np.float32)
  t_idx = np.argsort(-teacher, axis=-1)[:, :k].astype(np.int32)
  t_logit = np.take_along_axis(teacher, t_idx, -1)
  t_lse = _np_logsumexp(teacher / T).astype(np.float32)
  labels = r.randint(0, v, n).astype(np.int32)
  mask = (r.rand(n) > 0.25).astype(np.float32)  # padding
  return h, w, t_idx, t_logit, t_lse, labels, mask


@pytest.mark.parametrize("mode", loss.MODES)
def test_reference_equals_numpy(mode):
  h, w, t_idx, t_logit, t_lse, labels, mask = make_batch()
  s = h @ w
  got, metrics = loss.kd_loss_reference(jnp.asarray(s), t_idx, t_logit, t_lse, labels, mask,
                                        alpha=0.7, temperature=2.0, mode=mode)
  ref, ce, kl = numpy_kd(s, t_idx, t_logit, t_lse, labels, mask, 0.7, 2.0, mode)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", loss.MODES)
@pytest.mark.parametrize("chunk", [8, 53, 64])
def test_fused_equals_reference_value_and_grad(mode, chunk):
  h, w, t_idx, t_logit, t_lse, labels, mask = make_batch(seed=1)
  T, alpha = 2.0, 0.6

  def ref_fn(h, w):
    return loss.kd_loss_reference(h @ w, t_idx, t_logit, t_lse, labels, mask, alpha=alpha,
                                  temperature=T, mode=mode)

  def fused_fn(h, w):
    stats = vocab_stats(h, w, jnp.asarray(t_idx), jnp.asarray(labels), T, chunk)
    return loss.finalize(*loss.loss_from_stats(stats, t_idx, t_logit, t_lse, mask, alpha=alpha,
                                               temperature=T, mode=mode))

  (rv, rm), rg = jax.value_and_grad(ref_fn, argnums=(0, 1), has_aux=True)(h, w)
  (fv, fm), fg = jax.jit(jax.value_and_grad(fused_fn, argnums=(0, 1), has_aux=True))(h, w)
  np.testing.assert_allclose(fv, rv, rtol=1e-5)
  for k in rm:
    np.testing.assert_allclose(fm[k], rm[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(fg, rg):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_router_aux_equals_transformers():
  import torch
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
  r = np.random.RandomState(0)
  logits = [r.randn(2, 9, 6).astype(np.float32) for _ in range(3)]
  mask = (r.rand(2, 9) > 0.3).astype(np.int64)
  ref = load_balancing_loss_func(tuple(torch.tensor(l.reshape(-1, 6)) for l in logits), 6, 2,
                                 torch.tensor(mask))
  got = loss.router_aux_loss([jnp.asarray(l) for l in logits], jnp.asarray(mask), 2)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
