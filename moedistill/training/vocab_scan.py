"""Vocab-chunked scans over (hidden, lm_head) that never build [tokens x vocab] logits.

Legend: n tokens, d hidden, v vocab, c vocab chunk, k top-k, s temperatures.
`scan_vocab` walks [d, c] column slices of the lm_head in place (dynamic slices, no padded
copy; a last, shorter slice covers v % c). `topk_lse` gives the teacher's top-k logits/ids
(exact, ties to the lower id as a dense top_k; a running top-k over groups of ids, then one
top_k over the best groups' logits) and the full-vocab logsumexp at each temperature (online
logsumexp). Logits are float32.
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


def _chunk_groups(z_nc, start, g: int):
  """z as groups of g consecutive ids ([n, c/g, g], the tail padded with -inf), each group's
  max, and each group's first vocab id."""
  n, c = z_nc.shape
  pad = -c % g
  if pad:
    z_nc = jnp.pad(z_nc, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  z_ngg = z_nc.reshape(n, -1, g)
  first = start + g * jnp.arange(z_ngg.shape[1], dtype=jnp.int32)
  return z_ngg, jnp.max(z_ngg, axis=-1), first


def _merge_groups(best, z_ngg, gmax_ng, first_g):
  """The k groups with the largest max among the running ones and this chunk's, with their
  values. Ties go to the lower ids: running groups come first and top_k keeps order."""
  b_max, b_first, b_val = best
  k = b_max.shape[1]
  top_max, pos = jax.lax.top_k(jnp.concatenate([b_max, gmax_ng], axis=1), k)
  old, old_pos = pos < k, jnp.minimum(pos, k - 1)
  new_pos = jnp.clip(pos - k, 0, gmax_ng.shape[1] - 1)
  first = jnp.where(old, jnp.take_along_axis(b_first, old_pos, axis=1), first_g[new_pos])
  val = jnp.where(old[..., None], jnp.take_along_axis(b_val, old_pos[..., None], axis=1),
                  jnp.take_along_axis(z_ngg, new_pos[..., None], axis=1))
  return top_max, first, val


def topk_lse(h_nd, w_dv, k: int, temperatures, chunk: int = 8192, group: int = 32):
  """Returns (topk_logit [n, k] f32, topk_idx [n, k] int32, lse [n, s] f32).

  Exact top-k in two levels, because XLA:CPU's TopK costs a few us per row per call plus ~3 ns
  per element (a top_k per vocab chunk was most of the caching time): the k largest logits of
  a row lie in the k groups of `group` consecutive ids with the largest maxima (any other
  group's max is beaten by k maxima of disjoint groups). The scan keeps the k best groups and
  their logits (one top_k over group maxima per chunk); one last top_k runs over those k x
  group logits laid out in id order, so ties keep the lower id as a dense top_k."""
  n = h_nd.shape[0]
  temps = jnp.asarray(temperatures, jnp.float32)

  def fn(carry, w_dc, start):
    best, m, s = carry
    z, _ = chunk_logits(h_nd, w_dc, start)
    best = _merge_groups(best, *_chunk_groups(z, start, group))
    m, s = online_lse_update(m, s, z[None] / temps[:, None, None])
    return best, m, s

  no_group = jnp.iinfo(jnp.int32).max - group  # placeholder groups sort after real ones
  best = (jnp.full((n, k), -jnp.inf, jnp.float32), jnp.full((n, k), no_group, jnp.int32),
          jnp.full((n, k, group), -jnp.inf, jnp.float32))
  stats = (jnp.full((len(temperatures), n), -jnp.inf, jnp.float32),
           jnp.zeros((len(temperatures), n), jnp.float32))
  (_, first, val), m, s = scan_vocab(fn, (best, *stats), w_dv, chunk)
  order = jnp.argsort(first, axis=1)
  first = jnp.take_along_axis(first, order, axis=1)
  val = jnp.take_along_axis(val, order[..., None], axis=1).reshape(n, k * group)
  top_v, pos = jax.lax.top_k(val, k)
  top_i = jnp.take_along_axis(first, pos // group, axis=1) + pos % group
  return top_v, top_i, (m + jnp.log(s)).T
