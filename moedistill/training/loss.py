"""Blended distillation loss L = (1-alpha) CE + alpha T^2 KL, against cached teacher top-k.

Legend: n tokens (flattened batch), k cached top-k, v vocab.
Both paths reduce the student to per-token statistics
  lse_t (logsumexp of s/T), lse_1 (logsumexp of s), s_topk = s[I], s_label = s[label]
and share `loss_from_stats`:
  reference: from dense [n, v] student logits (the plain definition, for tests/eval);
  fused:     vocab_stats(hidden, lm_head) in fused_stats.py, never building [n, v].
Losses come back as SUMS over valid tokens plus the count, so micro-batches and shards add
up to the global mean exactly (divide once by the global count).
Modes (teacher p, student q, at temperature T; I = cached ids):
  bucket       p over I plus one tail bucket (1 - sum p_I) from the cached full-vocab lse;
               same for q from its own full-vocab lse. Exact KL of the bucketed distributions.
  renormalize  p and q both renormalised over I.
  teacher_only p renormalised over I; q full-vocab (sum_I p (log p - log q)).
  sampled      a sampled cache (cache.mode=sampled): p = the cached target weights w
               (data/topk_codec.sampled_weights, E[w] = the teacher's full distribution),
               q full-vocab: KL(w || q) = -sum_I w log q - H(w). H(w) does not depend on the
               student, so the gradient is that of the cross-entropy to w: (q - w) / T per
               student logit, whose expectation (q - p_teacher) / T is the full-vocab KD
               gradient. The value is KL to the empirical w, not to the teacher (it exceeds
               it on average by E[KL(w || p)]); differences between students are unbiased.
               The same arithmetic as teacher_only (w already sums to 1); bucket and
               renormalize would use w as top-k probabilities and are refused for such a
               cache (config.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("bucket", "renormalize", "teacher_only", "sampled")


def _log_tail(logp_nk):
  """log(1 - sum exp(logp)) computed as log(-expm1(logsumexp)); clamped for bf16 teachers
  whose rounded top-k mass can exceed 1 by an ulp."""
  top = jnp.minimum(jax.nn.logsumexp(logp_nk, axis=-1), -1e-7)
  return jnp.log(-jnp.expm1(top))


def _xlogy_diff(p, logp, logq):
  return jnp.where(p > 0, p * (logp - logq), 0.0)


def kl_terms(t_logit_nk, t_lse_n, s_topk_nk, s_lse_n, temperature, mode):
  """Per-token KL [n] and (teacher, student) top-k mass [n] for one mode."""
  t = temperature
  zt = t_logit_nk.astype(jnp.float32) / t
  zs = s_topk_nk / t
  if mode == "bucket":
    logp, logq = zt - t_lse_n[:, None], zs - s_lse_n[:, None]
    lp_tail, lq_tail = _log_tail(logp), _log_tail(logq)
    p, p_tail = jnp.exp(logp), jnp.exp(lp_tail)
    kl = jnp.sum(_xlogy_diff(p, logp, logq), -1) + _xlogy_diff(p_tail, lp_tail, lq_tail)
    return kl, jnp.sum(p, -1), jnp.sum(jnp.exp(logq), -1)
  logp = jax.nn.log_softmax(zt, axis=-1)
  if mode == "renormalize":
    logq = jax.nn.log_softmax(zs, axis=-1)
  elif mode in ("teacher_only", "sampled"):
    logq = zs - s_lse_n[:, None]
  else:
    raise ValueError(f"kd mode={mode!r}: expected one of {MODES}")
  p = jnp.exp(logp)
  mass_t = jnp.exp(jax.nn.logsumexp(zt - t_lse_n[:, None], axis=-1))
  mass_s = jnp.exp(jax.nn.logsumexp(zs - s_lse_n[:, None], axis=-1))
  return jnp.sum(_xlogy_diff(p, logp, logq), -1), mass_t, mass_s


def loss_from_stats(stats, topk_idx_nk, topk_logit_nk, t_lse_n, mask_n, *, alpha, temperature,
                    mode):
  """stats: dict lse_t, lse_1, s_topk, s_label, argmax. Returns (loss_sum, metric_sums)
  where metric sums are over valid tokens (count in metric_sums['tokens'])."""
  mask = mask_n.astype(jnp.float32)
  ce = stats["lse_1"] - stats["s_label"]
  kl, mass_t, mass_s = kl_terms(topk_logit_nk, t_lse_n, stats["s_topk"], stats["lse_t"],
                                temperature, mode)
  total = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
  agree = (stats["argmax"] == topk_idx_nk[:, 0]).astype(jnp.float32)
  s = lambda x: jnp.sum(x * mask)  # noqa: E731
  sums = {"ce": s(ce), "kl": s(kl), "kd_total": s(total), "teacher_topk_mass": s(mass_t),
          "student_topk_mass": s(mass_s), "top1_agreement": s(agree), "tokens": jnp.sum(mask)}
  return s(total), sums


def dense_stats(logits_nv, topk_idx_nk, labels_n, temperature):
  z = logits_nv.astype(jnp.float32)
  return {"lse_t": jax.nn.logsumexp(z / temperature, axis=-1),
          "lse_1": jax.nn.logsumexp(z, axis=-1),
          "s_topk": jnp.take_along_axis(z, topk_idx_nk, axis=-1),
          "s_label": jnp.take_along_axis(z, labels_n[:, None], axis=-1)[:, 0],
          "argmax": jnp.argmax(z, axis=-1).astype(jnp.int32)}


def kd_loss_reference(student_logits, topk_idx, topk_logit, lse, labels, mask, *, alpha,
                      temperature, mode="bucket"):
  """Plain dense definition over [..., v] logits; returns (mean loss, mean metrics)."""
  v = student_logits.shape[-1]
  k = topk_idx.shape[-1]
  stats = dense_stats(student_logits.reshape(-1, v), topk_idx.reshape(-1, k),
                      labels.reshape(-1), temperature)
  loss_sum, sums = loss_from_stats(stats, topk_idx.reshape(-1, k), topk_logit.reshape(-1, k),
                                   lse.reshape(-1), mask.reshape(-1), alpha=alpha,
                                   temperature=temperature, mode=mode)
  return finalize(loss_sum, sums)


def finalize(loss_sum, sums):
  n = jnp.maximum(sums["tokens"], 1.0)
  metrics = {k: v / n for k, v in sums.items() if k != "tokens"}
  metrics["tokens"] = sums["tokens"]
  return loss_sum / n, metrics


def router_aux_loss(router_logits, mask_bt, top_k: int):
  """Qwen3-MoE load-balancing loss (transformers' load_balancing_loss_func with an attention
  mask): E * sum_e f_e * P_e over all MoE layers' valid tokens, f_e = share of top-k slots,
  P_e = mean router probability."""
  if not router_logits:
    return jnp.zeros((), jnp.float32)
  e = router_logits[0].shape[-1]
  m = mask_bt.reshape(-1).astype(jnp.float32)
  f_sum, p_sum = jnp.zeros(e), jnp.zeros(e)
  for logits in router_logits:
    probs = jax.nn.softmax(logits.reshape(-1, e).astype(jnp.float32), axis=-1)
    _, sel = jax.lax.top_k(probs, top_k)
    hits = jnp.sum(jax.nn.one_hot(sel, e), axis=1)  # [n, e]
    f_sum = f_sum + jnp.sum(hits * m[:, None], 0)
    p_sum = p_sum + jnp.sum(probs * m[:, None], 0)
  rows = jnp.maximum(jnp.sum(m) * len(router_logits), 1.0)
  return e * jnp.sum(jax.lax.stop_gradient(f_sum / rows) * (p_sum / rows))
