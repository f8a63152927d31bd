"""Causal self-attention behind one function: `plain` (XLA), `blocked` (flash-style, pure JAX),
`cudnn` (cuDNN's fused flash attention, NVIDIA GPUs only) and `pallas` (jax's Pallas GPU flash
attention with segment ids, model/pallas_attention.py; interpret mode on CPU).

Legend: b batch, t positions, n query heads, g kv heads, r = n/g query heads per kv head,
h head dim; q/k a query/key block of `block` positions, nq/nk the number of such blocks.

Always causal; with segment ids a token attends only within its own segment (packed
documents). `plain` materialises [b, n, t, t] float32 scores (and autodiff saves the
probabilities); `blocked` holds one [b, q, g, r, k] score tile at a time in the forward and in
the backward: its custom VJP saves only the output and the per-row logsumexp and recomputes
each tile (FlashAttention-2, arXiv 2307.08691, algorithms 1 and 2), skipping tiles above the
diagonal. cuDNN attention cannot even be lowered without an NVIDIA GPU ("cuDNN is not
detected"); `auto` never picks it (see `resolve`), and everything else never touches it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moedistill.errors import ConfigError
from moedistill.model import pallas_attention

IMPLS = ("auto", "plain", "blocked", "cudnn", "pallas")
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) is 0 and never NaN (no inf - inf)


def nvidia_gpu() -> bool:
  """cuDNN flash attention needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer."""
  try:
    d = jax.devices()[0]
  except RuntimeError:
    return False
  if d.platform != "gpu" or "cuda" not in d.client.platform_version.lower():
    return False
  return float(getattr(d, "compute_capability", "0") or 0) >= 8.0


def resolve(impl: str, seq_len: int, dtype, block: int) -> str:
  """`auto` left by moe.resolve_runtime (which makes it `pallas` on NVIDIA GPUs, never cuDNN:
  with segment ids jax 0.10.2 gives cuDNN a dense [b, 1, t, t] mask): `blocked` for rows
  longer than one block, else `plain` (fastest for short rows)."""
  if impl not in IMPLS:
    raise ConfigError(f"attention={impl!r}: expected one of {list(IMPLS)}")
  if impl != "auto":
    return impl
  return "blocked" if seq_len > block else "plain"


def attention(q_btnh, k_btgh, v_btgh, segment_ids_bt=None, *, impl: str = "plain",
              block: int = 512):
  """Causal attention [b, t, n, h] -> [b, t, n, h] with an already resolved `impl`."""
  if impl == "blocked":
    b, t = q_btnh.shape[:2]
    segs = jnp.zeros((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    return blocked(q_btnh, k_btgh, v_btgh, segs.astype(jnp.int32), block, block)
  if impl == "pallas":  # Pallas GPU flash attention (Triton); interpret mode on CPU
    return pallas_attention.attention(q_btnh, k_btgh, v_btgh, segment_ids_bt)
  if impl not in ("plain", "cudnn"):
    raise ConfigError(f"attention impl={impl!r}: expected plain, blocked, cudnn or pallas "
                      "(resolved)")
  mask = None
  if segment_ids_bt is not None:
    # cuDNN turns this into a [b, 1, t, t] bias (one per row, not per head); the scores and
    # probabilities stay inside its fused kernel.
    mask = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_btnh, k_btgh, v_btgh, mask=mask, is_causal=True,
                                      implementation="cudnn" if impl == "cudnn" else "xla")


# --- blocked ---------------------------------------------------------------------------------
def _pad_blocks(x, block):
  """[b, t, ...] -> [nb, b, block, ...], zero-padded at the end (the block axis first, so a
  loop indexes it with one dynamic index)."""
  b, t = x.shape[:2]
  nb = -(-t // block)
  x = jnp.pad(x, [(0, 0), (0, nb * block - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, nb, block, *x.shape[2:]), 1, 0)


def _unblock(x, t):
  """[nb, b, block, ...] -> [b, t, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _tile_scores(q_bqgrh, k_bkgh, seg_q_bq, seg_k_bk, i, j, bq, bk, t):
  """Scaled scores [b, q, g, r, k] in float32 with masked entries at _NEG, and the mask."""
  s = jnp.einsum("bqgrh,bkgh->bqgrk", q_bqgrh, k_bkgh, preferred_element_type=jnp.float32)
  s = s * (q_bqgrh.shape[-1] ** -0.5)
  q_pos = i * bq + jnp.arange(bq)
  k_pos = j * bk + jnp.arange(bk)
  # Causal, key not padding, same segment. Padded query rows may attend to anything: their
  # outputs are dropped and their cotangents are zero.
  allowed = (q_pos[:, None] >= k_pos[None, :]) & (k_pos < t)[None, :]
  mask = allowed[None] & (seg_q_bq[:, :, None] == seg_k_bk[:, None, :])
  mask = mask[:, :, None, None, :]
  return jnp.where(mask, s, _NEG), mask


def _blocks(q, k, v, segs, bq, bk):
  b, t, n, h = q.shape
  g = k.shape[2]
  qb = _pad_blocks(q.reshape(b, t, g, n // g, h), bq)
  return (qb, _pad_blocks(k, bk), _pad_blocks(v, bk), _pad_blocks(segs, bq),
          _pad_blocks(segs, bk))


def _forward(q, k, v, segs, bq, bk):
  """Output [b, t, n, h] and logsumexp per row [nq, b, q, g, r] (float32)."""
  b, t, n, h = q.shape
  qb, kb, vb, sqb, skb = _blocks(q, k, v, segs, bq, bk)
  nk = kb.shape[0]

  def q_block(args):
    i, q_i, sq_i = args

    def kv_step(j, carry):
      m, l, acc = carry
      s, mask = _tile_scores(q_i, kb[j], sq_i, skb[j], i, j, bq, bk, t)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bqgrk,bkgh->bqgrh", p.astype(v.dtype), vb[j],
                      preferred_element_type=jnp.float32)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    stats = q_i.shape[:-1]
    init = (jnp.full(stats, _NEG, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32))
    # Key blocks above the diagonal are all masked: stop at the last one this block can see.
    m, l, acc = jax.lax.fori_loop(0, jnp.minimum(nk, (i * bq + bq - 1) // bk + 1), kv_step, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    return (acc / safe_l[..., None]).astype(q.dtype), jnp.where(l > 0, m + jnp.log(safe_l), 0.0)

  o_b, lse_b = jax.lax.map(q_block, (jnp.arange(qb.shape[0]), qb, sqb))
  return _unblock(o_b, t).reshape(b, t, n, h), lse_b


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked(q_btnh, k_btgh, v_btgh, segment_ids_bt, block_q: int, block_k: int):
  """Flash-style causal attention in pure JAX; equals `plain` in value and gradient."""
  return _forward(q_btnh, k_btgh, v_btgh, segment_ids_bt, block_q, block_k)[0]


def _blocked_fwd(q, k, v, segs, bq, bk):
  o, lse_b = _forward(q, k, v, segs, bq, bk)
  return o, (q, k, v, segs, o, lse_b)


def _blocked_bwd(bq, bk, res, do_btnh):
  """dq, dk, dv by recomputing each tile's probabilities from the saved logsumexp. Outer loop
  over key blocks (their dk, dv accumulate in registers of the loop), inner over the query
  blocks at or below the diagonal; dq accumulates in a carried [nq, b, q, g, r, h] buffer."""
  q, k, v, segs, o, lse_b = res
  b, t, n, h = q.shape
  g = k.shape[2]
  qb, kb, vb, sqb, skb = _blocks(q, k, v, segs, bq, bk)
  dob = _pad_blocks(do_btnh.reshape(b, t, g, n // g, h), bq)
  # D_i = rowsum(dO_i * O_i): the softmax Jacobian's correction term per row.
  d_b = _pad_blocks(jnp.sum(do_btnh.astype(jnp.float32) * o.astype(jnp.float32), -1)
                    .reshape(b, t, g, n // g), bq)
  nq, scale = qb.shape[0], h ** -0.5

  def kv_block(dq, args):
    j, k_j, v_j, sk_j = args

    def q_step(i, carry):
      dq, dk, dv = carry
      s, mask = _tile_scores(qb[i], k_j, sqb[i], sk_j, i, j, bq, bk, t)
      p = jnp.where(mask, jnp.exp(s - lse_b[i][..., None]), 0.0)
      dv = dv + jnp.einsum("bqgrk,bqgrh->bkgh", p.astype(dob.dtype), dob[i],
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqgrh,bkgh->bqgrk", dob[i], v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - d_b[i][..., None]) * scale).astype(q.dtype)
      dq_i = dq[i] + jnp.einsum("bqgrk,bkgh->bqgrh", ds, k_j, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_index_in_dim(dq, dq_i, i, 0)
      dk = dk + jnp.einsum("bqgrk,bqgrh->bkgh", ds, qb[i], preferred_element_type=jnp.float32)
      return dq, dk, dv

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop((j * bk) // bq, nq, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq_b, (dk_b, dv_b) = jax.lax.scan(kv_block, jnp.zeros(qb.shape, jnp.float32),
                                    (jnp.arange(kb.shape[0]), kb, vb, skb))
  dq = _unblock(dq_b, t).reshape(b, t, n, h).astype(q.dtype)
  return dq, _unblock(dk_b, t).astype(k.dtype), _unblock(dv_b, t).astype(v.dtype), None


blocked.defvjp(_blocked_fwd, _blocked_bwd)
