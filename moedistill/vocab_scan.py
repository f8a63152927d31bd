"""Vocab-chunked scans over (hidden, lm_head) that never build [tokens x vocab] logits.

Legend: n tokens, d hidden, v vocab, c vocab chunk, k top-k, s temperatures.
`scan_vocab` walks [d, c] column slices of the lm_head in place (dynamic slices, no padded
copy; a last, shorter slice covers v % c). `topk_lse` gives the teacher's top-k logits/ids
(per-chunk top-k merged into a running top-k; ties go to the lower id, as a dense top_k) and
the full-vocab logsumexp at each temperature (online logsumexp). Logits are float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def scan_vocab(fn, carry, w_dv, chunk: int):
  """carry = fn(carry, w_dc, start) over consecutive column slices of w_dv."""
  v = w_dv.shape[1]
  n_full, tail = divmod(v, chunk)
  if n_full:
    def body(carry, c):
      start = c * chunk
      return fn(carry, jax.lax.dynamic_slice_in_dim(w_dv, start, chunk, axis=1), start), None
    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32))
  if tail:
    carry = fn(carry, w_dv[:, n_full * chunk:], n_full * chunk)
  return carry


def chunk_logits(h_nd, w_dc, start):
  """float32 logits of one slice and the slice's vocab ids."""
  z = jnp.dot(h_nd, w_dc.astype(h_nd.dtype), preferred_element_type=jnp.float32)
  return z, start + jnp.arange(w_dc.shape[1], dtype=jnp.int32)


def online_lse_update(m, s, z):
  """One step of a streaming logsumexp over the last axis: state (max m, scaled sum s)."""
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
  return m_new, s


def topk_lse(h_nd, w_dv, k: int, temperatures, chunk: int = 8192):
  """Returns (topk_logit [n, k] f32, topk_idx [n, k] int32, lse [n, s] f32)."""
  n = h_nd.shape[0]
  temps = jnp.asarray(temperatures, jnp.float32)

  def fn(carry, w_dc, start):
    top_v, top_i, m, s = carry
    z, ids = chunk_logits(h_nd, w_dc, start)
    cv, ci = jax.lax.top_k(z, min(k, w_dc.shape[1]))
    top_v, pos = jax.lax.top_k(jnp.concatenate([top_v, cv], axis=1), k)
    top_i = jnp.take_along_axis(jnp.concatenate([top_i, ids[ci]], axis=1), pos, axis=1)
    m, s = online_lse_update(m, s, z[None] / temps[:, None, None])
    return top_v, top_i, m, s

  init = (jnp.full((n, k), -jnp.inf, jnp.float32), jnp.zeros((n, k), jnp.int32),
          jnp.full((len(temperatures), n), -jnp.inf, jnp.float32),
          jnp.zeros((len(temperatures), n), jnp.float32))
  top_v, top_i, m, s = scan_vocab(fn, init, w_dv, chunk)
  return top_v, top_i, (m + jnp.log(s)).T
