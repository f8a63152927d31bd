"""vocab_stats: the student's per-token loss statistics from (hidden, lm_head) without ever
building [tokens x vocab] logits, with a custom VJP that recomputes each vocab chunk.

Legend: n tokens, d hidden, v vocab, c vocab chunk, k cached top-k ids.
Outputs: lse_t = logsumexp(z/T), lse_1 = logsumexp(z), s_topk = z[idx], s_label = z[label],
argmax = argmax(z) (no gradient). Backward per chunk, with cotangents ct_*:
  g = ct_t * softmax(z/T) / T + ct_1 * softmax(z) + scatter(ct_topk at idx, ct_label at label)
  dh += g @ W_c^T,   dW_c = h^T @ g.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moedistill.training.vocab_scan import chunk_logits, online_lse_update, scan_vocab


def _gather_in_chunk(z_nc, ids_nk, start):
  """z at global ids that fall in this slice, else 0."""
  c = z_nc.shape[1]
  local = ids_nk - start
  inside = (local >= 0) & (local < c)
  got = jnp.take_along_axis(z_nc, jnp.clip(local, 0, c - 1), axis=1)
  return jnp.where(inside, got, 0.0)


def _chunk_argmax(z_nc, group: int = 32):
  """(max, first argmax) of each row. Two levels (max per group of ids, argmax over the group
  maxima, then within the winning group) because XLA:CPU's argmax, a variadic reduce, ran
  ~75 ms on [1024, 8192] against ~1 ms for max (most of the loss forward)."""
  n, c = z_nc.shape
  pad = -c % group
  if pad:
    z_nc = jnp.pad(z_nc, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  z_ngg = z_nc.reshape(n, -1, group)
  gmax = jnp.max(z_ngg, axis=-1)
  gi = jnp.argmax(gmax, axis=1)  # first group holding the row max
  inner = jnp.take_along_axis(z_ngg, gi[:, None, None], axis=1)[:, 0]
  return jnp.max(gmax, axis=1), (gi * group + jnp.argmax(inner, axis=1)).astype(jnp.int32)


def _forward(h_nd, w_dv, idx_nk, label_n, temperature, chunk):
  n = h_nd.shape[0]
  ids = jnp.concatenate([idx_nk, label_n[:, None]], axis=1)

  def fn(carry, w_dc, start):
    mt, st, m1, s1, gathered, best_v, best_i = carry
    z, _ = chunk_logits(h_nd, w_dc, start)
    mt, st = online_lse_update(mt, st, z / temperature)
    m1, s1 = online_lse_update(m1, s1, z)
    gathered = gathered + _gather_in_chunk(z, ids, start)
    cmax, carg = _chunk_argmax(z)
    better = cmax > best_v  # strict: ties keep the lower id, as a dense argmax
    best_i = jnp.where(better, start + carg, best_i)
    return mt, st, m1, s1, gathered, jnp.maximum(best_v, cmax), best_i

  f32 = jnp.float32
  init = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.full((n,), -jnp.inf, f32),
          jnp.zeros((n,), f32), jnp.zeros(ids.shape, f32), jnp.full((n,), -jnp.inf, f32),
          jnp.zeros((n,), jnp.int32))
  mt, st, m1, s1, gathered, _, best_i = scan_vocab(fn, init, w_dv, chunk)
  return {"lse_t": mt + jnp.log(st), "lse_1": m1 + jnp.log(s1), "s_topk": gathered[:, :-1],
          "s_label": gathered[:, -1], "argmax": best_i}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def vocab_stats(h_nd, w_dv, idx_nk, label_n, temperature: float, chunk: int):
  return _forward(h_nd, w_dv, idx_nk, label_n, temperature, chunk)


def _fwd(h_nd, w_dv, idx_nk, label_n, temperature, chunk):
  out = _forward(h_nd, w_dv, idx_nk, label_n, temperature, chunk)
  return out, (h_nd, w_dv, idx_nk, label_n, out["lse_t"], out["lse_1"])


def _bwd(temperature, chunk, res, ct):
  h_nd, w_dv, idx_nk, label_n, lse_t, lse_1 = res
  n, d = h_nd.shape
  ids = jnp.concatenate([idx_nk, label_n[:, None]], axis=1)
  ct_ids = jnp.concatenate([ct["s_topk"], ct["s_label"][:, None]], axis=1).astype(jnp.float32)
  ct_t, ct_1 = ct["lse_t"].astype(jnp.float32), ct["lse_1"].astype(jnp.float32)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids.shape)
  # bf16 inputs: bf16 dots on accelerators; float32 on CPU, where XLA ran these two bf16 dots
  # at a third of the float32 rate (measured at [1024, 8192] x [8192, 128]).
  cdt = jnp.float32 if jax.default_backend() == "cpu" else h_nd.dtype

  def fn(carry, w_dc, start):
    dh, dw = carry
    z, _ = chunk_logits(h_nd, w_dc, start)
    g = (ct_t[:, None] / temperature) * jnp.exp(z / temperature - lse_t[:, None])
    g = g + ct_1[:, None] * jnp.exp(z - lse_1[:, None])
    c = w_dc.shape[1]
    local = ids - start
    local = jnp.where((local >= 0) & (local < c), local, c)  # out of slice: dropped
    g = g.at[rows, local].add(ct_ids, mode="drop")
    dh = dh + jnp.dot(g.astype(cdt), w_dc.T.astype(cdt), preferred_element_type=jnp.float32)
    dw_dc = jnp.dot(h_nd.T.astype(cdt), g.astype(cdt), preferred_element_type=jnp.float32)
    # Each column belongs to one slice: casting per slice loses nothing.
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_dc.astype(dw.dtype), start, axis=1)

  dh, dw = scan_vocab(fn, (jnp.zeros((n, d), jnp.float32), jnp.zeros_like(w_dv)), w_dv, chunk)
  return (dh.astype(h_nd.dtype), dw, None, None)


vocab_stats.defvjp(_fwd, _bwd)
