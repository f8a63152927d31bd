"""Vocab-chunked scans over (hidden, lm_head) that never build [tokens x vocab] logits.

Legend: n tokens, d hidden, v vocab, c vocab chunk, k top-k, s temperatures.
`topk_lse` gives the teacher's top-k logits/ids (per-chunk top-k merged into a running top-k;
ties go to the lower id, as a dense top_k) and the full-vocab logsumexp at each temperature
(online logsumexp). Logits are float32 (bf16 inputs accumulate in float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_kernel(w_dv, chunk: int):
  """[d, v] -> ([nc, d, c] zero-padded, v)."""
  d, v = w_dv.shape
  nc = -(-v // chunk)
  w = jnp.pad(w_dv, ((0, 0), (0, nc * chunk - v)))
  return w.reshape(d, nc, chunk).transpose(1, 0, 2), v


def chunk_logits(h_nd, w_dc, c_idx, chunk: int, v: int):
  """float32 logits of one chunk, padded columns at -inf; also the chunk's vocab ids."""
  z = jnp.dot(h_nd, w_dc.astype(h_nd.dtype), preferred_element_type=jnp.float32)
  ids = c_idx * chunk + jnp.arange(chunk, dtype=jnp.int32)
  return jnp.where(ids < v, z, -jnp.inf), ids


def online_lse_update(m, s, z):
  """One step of a streaming logsumexp over the last axis: state (max m, scaled sum s)."""
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
  return m_new, s


def topk_lse(h_nd, w_dv, k: int, temperatures, chunk: int = 8192):
  """Returns (topk_logit [n, k] f32, topk_idx [n, k] int32, lse [n, s] f32)."""
  n = h_nd.shape[0]
  temps = jnp.asarray(temperatures, jnp.float32)
  w_cdc, v = chunked_kernel(w_dv, chunk)
  kk = min(k, chunk)

  def body(carry, xs):
    top_v, top_i, m, s = carry
    c_idx, w_dc = xs
    z, ids = chunk_logits(h_nd, w_dc, c_idx, chunk, v)
    cv, ci = jax.lax.top_k(z, kk)
    mv = jnp.concatenate([top_v, cv], axis=1)
    mi = jnp.concatenate([top_i, ids[ci]], axis=1)
    top_v, pos = jax.lax.top_k(mv, k)
    top_i = jnp.take_along_axis(mi, pos, axis=1)
    m, s = online_lse_update(m, s, z[None] / temps[:, None, None])
    return (top_v, top_i, m, s), None

  init = (jnp.full((n, k), -jnp.inf, jnp.float32), jnp.zeros((n, k), jnp.int32),
          jnp.full((len(temperatures), n), -jnp.inf, jnp.float32),
          jnp.zeros((len(temperatures), n), jnp.float32))
  xs = (jnp.arange(w_cdc.shape[0], dtype=jnp.int32), w_cdc)
  (top_v, top_i, m, s), _ = jax.lax.scan(body, init, xs)
  return top_v, top_i, (m + jnp.log(s)).T
