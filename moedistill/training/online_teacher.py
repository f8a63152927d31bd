"""Full-vocabulary divergences between a teacher and a student from their final hidden states
and lm_heads, chunk by chunk over the vocabulary: never a [tokens x vocab] array.

Legend: n tokens, d student hidden, e teacher hidden, v vocab, c vocab chunk.
At temperature T: a = z/T (scaled logits), p = softmax(a_teacher), q = softmax(a_student).

`divergence(hs, ws, ht, wt, T, chunk, beta)` -> per-token D [n] and the teacher's argmax [n]:
  beta = 0  forward KL(p || q)  (what distillation from a teacher's full distribution uses)
  beta = 1  reverse KL(q || p)  (on-policy distillation)
  0 < beta < 1  generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1-beta) q
(the convention of GKD, Agarwal et al. 2024, and TRL's generalized_jsd_loss).

Forward, beta in {0, 1}: one scan with two online logsumexps plus, per side, a running
  w = sum exp(a_x - m_x) (a_x - a_y)  rescaled with m_x like the lse sum s_x, so that
  KL(p || q) = w_t / s_t - lse_t + lse_s   and   KL(q || p) = w_s / s_s - lse_s + lse_t.
Forward, 0 < beta < 1: log m needs normalised p and q, so a first scan gets both lses and a
  second sums the two KLs to m.
Backward (custom VJP, one scan recomputing each chunk), per token with cotangent ct:
  dD/da_s = q - p                                          (beta = 0)
          = (1 - beta) q (log q - log m - KL(q || m))      (beta > 0; m = p when beta = 1)
  dz_s = ct dD/da_s / T;  dh_s += dz_s W_s,c^T;  dW_s,c = h_s^T dz_s.
The teacher's inputs get zero gradients: it is frozen (a constant, as under stop_gradient).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moedistill.training.fused_stats import _chunk_argmax
from moedistill.training.vocab_scan import chunk_logits


def scan_vocab_pair(fn, carry, ws_dv, wt_ev, chunk: int):
  """carry = fn(carry, ws_dc, wt_ec, start) over the same consecutive column slices of both
  heads (dynamic slices, no copies; a last shorter slice covers v % c)."""
  v = ws_dv.shape[1]
  n_full, tail = divmod(v, chunk)
  if n_full:
    def body(carry, c):
      start = c * chunk
      sl = lambda w: jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)  # noqa: E731
      return fn(carry, sl(ws_dv), sl(wt_ev), start), None
    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32))
  if tail:
    carry = fn(carry, ws_dv[:, n_full * chunk:], wt_ev[:, n_full * chunk:], n_full * chunk)
  return carry


def _scaled(hs, ws_c, ht, wt_c, start, temperature):
  zs, _ = chunk_logits(hs, ws_c, start)
  zt, _ = chunk_logits(ht, wt_c, start)
  return zs, zt, zs / temperature, zt / temperature


def _log_mix(logp, logq, beta):
  return jnp.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))


def _xlogy_diff(x, logx, logy):
  """x (log x - log y), 0 where x underflows to 0 (log x is then -inf or very negative)."""
  return jnp.where(x > 0, x * (logx - logy), 0.0)


def _online_pass(hs, ws, ht, wt, temperature, chunk):
  """One scan: lse_s, lse_t, KL(p || q), KL(q || p), teacher argmax."""
  n = hs.shape[0]
  f32 = jnp.float32

  def fn(carry, ws_c, wt_c, start):
    ms, ss, ws_acc, mt, st, wt_acc, best_v, best_i = carry
    _, zt, a_s, a_t = _scaled(hs, ws_c, ht, wt_c, start, temperature)
    ms_new = jnp.maximum(ms, jnp.max(a_s, axis=-1))
    mt_new = jnp.maximum(mt, jnp.max(a_t, axis=-1))
    es, et = jnp.exp(a_s - ms_new[:, None]), jnp.exp(a_t - mt_new[:, None])
    rs, rt = jnp.exp(ms - ms_new), jnp.exp(mt - mt_new)  # 0 on the first chunk (m = -inf)
    ss, st = ss * rs + jnp.sum(es, -1), st * rt + jnp.sum(et, -1)
    ws_acc = ws_acc * rs + jnp.sum(es * (a_s - a_t), -1)
    wt_acc = wt_acc * rt + jnp.sum(et * (a_t - a_s), -1)
    cmax, carg = _chunk_argmax(zt)
    better = cmax > best_v  # strict: ties keep the lower id, as a dense argmax
    best_i = jnp.where(better, start + carg, best_i)
    return ms_new, ss, ws_acc, mt_new, st, wt_acc, jnp.maximum(best_v, cmax), best_i

  neg, zero = jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32)
  ms, ss, ws_acc, mt, st, wt_acc, _, best_i = scan_vocab_pair(
      fn, (neg, zero, zero, neg, zero, zero, neg, jnp.zeros((n,), jnp.int32)), ws, wt, chunk)
  lse_s, lse_t = ms + jnp.log(ss), mt + jnp.log(st)
  # Each KL is >= 0; the clamp only removes float32 rounding below 0.
  kl_pq = jnp.maximum(wt_acc / st - lse_t + lse_s, 0.0)
  kl_qp = jnp.maximum(ws_acc / ss - lse_s + lse_t, 0.0)
  return lse_s, lse_t, kl_pq, kl_qp, best_i


def _mixture_pass(hs, ws, ht, wt, temperature, chunk, lse_s, lse_t, beta):
  """Second scan for 0 < beta < 1: KL(p || m) and KL(q || m)."""
  n = hs.shape[0]

  def fn(carry, ws_c, wt_c, start):
    k_pm, k_qm = carry
    _, _, a_s, a_t = _scaled(hs, ws_c, ht, wt_c, start, temperature)
    logq, logp = a_s - lse_s[:, None], a_t - lse_t[:, None]
    logm = _log_mix(logp, logq, beta)
    return (k_pm + jnp.sum(_xlogy_diff(jnp.exp(logp), logp, logm), -1),
            k_qm + jnp.sum(_xlogy_diff(jnp.exp(logq), logq, logm), -1))

  zero = jnp.zeros((n,), jnp.float32)
  return scan_vocab_pair(fn, (zero, zero), ws, wt, chunk)


def _forward(hs, ws, ht, wt, temperature, chunk, beta):
  lse_s, lse_t, kl_pq, kl_qp, t_argmax = _online_pass(hs, ws, ht, wt, temperature, chunk)
  if beta == 0.0:
    div, k_qm = kl_pq, kl_qp  # k_qm unused by the backward at beta = 0
  elif beta == 1.0:
    div, k_qm = kl_qp, kl_qp
  else:
    k_pm, k_qm = _mixture_pass(hs, ws, ht, wt, temperature, chunk, lse_s, lse_t, beta)
    div = beta * k_pm + (1.0 - beta) * k_qm
  return {"div": div, "teacher_argmax": t_argmax}, (lse_s, lse_t, k_qm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def divergence(hs_nd, ws_dv, ht_ne, wt_ev, temperature: float, chunk: int, beta: float):
  """{'div': per-token divergence [n] float32 (see the module docstring), 'teacher_argmax':
  [n] int32 (no gradient)} at `temperature`; gradients reach the student's hidden and head."""
  return _forward(hs_nd, ws_dv, ht_ne, wt_ev, temperature, chunk, beta)[0]


def _fwd(hs, ws, ht, wt, temperature, chunk, beta):
  out, (lse_s, lse_t, k_qm) = _forward(hs, ws, ht, wt, temperature, chunk, beta)
  return out, (hs, ws, ht, wt, lse_s, lse_t, k_qm)


def _bwd(temperature, chunk, beta, res, ct):
  hs, ws, ht, wt, lse_s, lse_t, k_qm = res
  n, d = hs.shape
  ct_n = ct["div"].astype(jnp.float32)
  # As fused_stats: float32 dots on CPU (bf16 ran at a third of the rate there).
  cdt = jnp.float32 if jax.default_backend() == "cpu" else hs.dtype

  def fn(carry, ws_c, wt_c, start):
    dh, dw = carry
    _, _, a_s, a_t = _scaled(hs, ws_c, ht, wt_c, start, temperature)
    logq, logp = a_s - lse_s[:, None], a_t - lse_t[:, None]
    q = jnp.exp(logq)
    if beta == 0.0:
      g = q - jnp.exp(logp)
    else:
      logm = logp if beta == 1.0 else _log_mix(logp, logq, beta)
      factor = 1.0 if beta == 1.0 else 1.0 - beta
      g = factor * (_xlogy_diff(q, logq, logm) - q * k_qm[:, None])
    g = g * (ct_n / temperature)[:, None]
    dh = dh + jnp.dot(g.astype(cdt), ws_c.T.astype(cdt), preferred_element_type=jnp.float32)
    dw_c = jnp.dot(hs.T.astype(cdt), g.astype(cdt), preferred_element_type=jnp.float32)
    # Each column belongs to one slice: casting per slice loses nothing.
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, axis=1)

  dh, dw = scan_vocab_pair(fn, (jnp.zeros((n, d), jnp.float32), jnp.zeros_like(ws)), ws, wt,
                           chunk)
  return dh.astype(hs.dtype), dw, jnp.zeros_like(ht), jnp.zeros_like(wt)


divergence.defvjp(_fwd, _bwd)


def generalized_jsd(student_hidden, student_head, teacher_hidden, teacher_head, mask,
                    temperature: float, chunk: int = 4096, beta: float = 0.0):
  """Per-token generalised JSD [n] (0 where mask is False): beta = 0 forward KL(teacher ||
  student), beta = 1 reverse KL(student || teacher). student_hidden [n, d] with student_head
  [d, v]; teacher_hidden [n, e] with teacher_head [e, v]; each side uses its own head."""
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta={beta}: expected a value in [0, 1]")
  out = divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                   float(temperature), int(chunk), float(beta))
  return jnp.where(mask, out["div"], 0.0)


def full_vocab_kl(student_hidden, student_head, teacher_hidden, teacher_head, mask,
                  temperature: float, chunk: int = 4096):
  """Per-token KL(p_T^teacher || p_T^student) over the whole vocabulary [n] (0 where mask is
  False), with its gradient for the student's hidden states and head."""
  return generalized_jsd(student_hidden, student_head, teacher_hidden, teacher_head, mask,
                         temperature, chunk, 0.0)


def model_kl_sums(student, teacher, tokens_bt, segs_bt, temperature: float, chunk: int):
  """{'kl_full': sum over valid tokens of the full-vocab KL, 'tokens': their count} of two
  models (NNX Qwen3MoeForCausalLM) on one batch (what `evaluate --full_vocab` adds)."""
  from moedistill.training.train_step import labels_and_mask
  _, mask = labels_and_mask(tokens_bt, segs_bt)
  hs, _ = student.hidden(tokens_bt, segs_bt)
  ht, _ = teacher.hidden(tokens_bt, segs_bt)
  b, t, _ = hs.shape
  kl = full_vocab_kl(hs.reshape(b * t, -1), student.lm_head_kernel(), ht.reshape(b * t, -1),
                     teacher.lm_head_kernel(), mask.reshape(-1), temperature, chunk)
  return {"kl_full": jnp.sum(kl), "tokens": jnp.sum(mask.astype(jnp.float32))}


def micro_sums(model, teacher, tokens_bt, segs_bt, sc):
  """teacher_mode=online, one micro-batch: (loss sum, metric sums, the student's aux) with
  per valid token L = (1 - alpha) CE + alpha T^2 KL(p_T^teacher || p_T^student), the KL exact
  over the whole vocabulary. The teacher is a constant (stop_gradient on its hidden states
  and head): only the student's params get gradients. CE and the student's argmax come from
  fused_stats.vocab_stats (no cached ids: an empty [n, 0] gather)."""
  from moedistill.training.fused_stats import vocab_stats
  from moedistill.training.train_step import labels_and_mask
  labels, mask = labels_and_mask(tokens_bt, segs_bt)
  hs, aux = model.hidden(tokens_bt, segs_bt)
  ht, _ = teacher.hidden(tokens_bt, segs_bt)
  b, t, d = hs.shape
  n = b * t
  hs = hs.reshape(n, d)
  ht = jax.lax.stop_gradient(ht.reshape(n, -1))
  wt = jax.lax.stop_gradient(teacher.lm_head_kernel())
  ws = model.lm_head_kernel()
  stats = vocab_stats(hs, ws, jnp.zeros((n, 0), jnp.int32), labels.reshape(-1), 1.0,
                      sc.vocab_chunk)
  out = divergence(hs, ws, ht, wt, float(sc.temperature), int(sc.vocab_chunk), 0.0)
  valid = mask.reshape(-1)
  ce, kl = stats["lse_1"] - stats["s_label"], out["div"]
  total = (1.0 - sc.alpha) * ce + sc.alpha * sc.temperature ** 2 * kl
  agree = (stats["argmax"] == out["teacher_argmax"]).astype(jnp.float32)
  s = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
  sums = {"ce": s(ce), "kl": s(kl), "kd_total": s(total), "top1_agreement": s(agree),
          "tokens": jnp.sum(valid.astype(jnp.float32))}
  return s(total), sums, aux
