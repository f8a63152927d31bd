"""Draws from the teacher's full-vocab distribution without building [tokens x vocab] logits.

Inverse-CDF sampling over the vocab-chunked scan: for uniforms u [n, N], the drawn id is the
number of ids whose inclusive cumulative probability is below u, i.e. the sum over vocab
chunks of searchsorted(C + cumsum(p_chunk), u) clipped to the chunk (C the mass of the chunks
before). p = exp(z / T - lse_T) with the lse of `topk_lse`'s pass; ids in `excl` (the exact
top ids of `cache.exact_k`) get p = 0, and u is scaled to the remaining mass, so the draw is
from p restricted to the rest. The cumulative sums are float32: an id's interval is off by
the rounding of the running sum (~1e-7 of the mass), far below what N draws resolve; a u
past the float32 total (that rounding again) draws the last id. With exact ids holding all
but ~1e-6 of the mass, the rest's rounding is relative to that sliver, but so is its weight
in the loss (R c / N, data/topk_codec.sampled_weights).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moedistill.training.vocab_scan import chunk_logits, scan_vocab


def sample_ids(h_nd, w_dv, u_nN, lse_n, temperature: float, chunk: int, excl_nE=None,
               excl_logit_nE=None):
  """ids [n, N] int32 drawn with replacement; u in [0, 1), lse the full-vocab logsumexp of
  the logits / T; excl / excl_logit: ids left out and their logits (same scale as lse)."""
  n, v = h_nd.shape[0], w_dv.shape[1]
  u = u_nN.astype(jnp.float32)
  if excl_nE is not None and excl_nE.shape[1]:
    p_ex = jnp.exp(excl_logit_nE.astype(jnp.float32) / temperature - lse_n[:, None])
    rest = jnp.clip(1.0 - jnp.sum(p_ex, axis=1), 0.0, 1.0)
    u = u * rest[:, None]
  else:
    excl_nE = None

  def fn(carry, w_dc, start):
    c_n, count = carry
    z, ids = chunk_logits(h_nd, w_dc, start)
    p = jnp.exp(z / temperature - lse_n[:, None])
    if excl_nE is not None:
      p = jnp.where(jnp.any(ids[None, :, None] == excl_nE[:, None, :], axis=-1), 0.0, p)
    cum = c_n[:, None] + jnp.cumsum(p, axis=1)
    count = count + jax.vmap(lambda a, x: jnp.searchsorted(a, x, side="right"))(cum, u)
    return cum[:, -1], count

  carry = (jnp.zeros((n,), jnp.float32), jnp.zeros(u.shape, jnp.int32))
  _, count = scan_vocab(fn, carry, w_dv, chunk)
  # count = #ids with cumulative mass <= u: the drawn id (its interval [C_{i-1}, C_i) holds
  # u). The clip covers u beyond the float32 total.
  return jnp.minimum(count, v - 1).astype(jnp.int32)
