"""`model.attention=pallas`: causal flash attention with segment ids through jax's Pallas GPU
kernel (jax.experimental.pallas.ops.gpu.attention.mha, Triton lowering: NVIDIA GPUs from
Ampere on); on CPU the same kernel in Pallas interpret mode (pallas_gmm.interpret).

Legend: b batch, t positions, n query heads, g kv heads, r = n/g, h head dim.

Memory is O(t) per (row, head): the forward keeps one [block_q, block_k] score tile per program
and saves only the output and the per-row logsumexp; the backward recomputes the tiles. Segment
ids enter the kernel as a [b, t] vector compared tile by tile, never as a [t, t] mask.

GQA: kv heads are repeated r times to n heads before the kernel. mha's grid walks query heads
and reads the k/v head of the same index (its BlockSpecs share the head index), so a grouped
layout cannot be expressed without rewriting the kernel; the repeat costs r x the k/v bytes
(b*t*n*h, still O(t)), and autodiff of the repeat sums dk, dv over each group of r query heads,
which is exact.

Padding: t is padded to a multiple of the blocks (Triton tensors must be powers of two, and the
kernel needs t divisible by its blocks): blocks are min(128, tp) forward and min(32, tp)
backward, tp = the next power of two >= max(t, 16) up to 128, else a multiple of 128. Padded
positions come after every real one, so causality hides them from real queries; each padded
query sees at least itself (no empty softmax row); their outputs are sliced off and their zero
cotangents add nothing to dk, dv. The head dim is padded to a power of two by mha itself
(masked loads).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention

from moedistill.model import pallas_gmm

BLOCK_Q = 128  # forward blocks (mha's defaults)
BLOCK_BWD = 32  # backward blocks (mha's defaults)


def padded_len(t: int) -> int:
  """Rows padded to the next power of two >= max(t, 16) up to 128, else a multiple of 128."""
  return max(16, 1 << (t - 1).bit_length()) if t <= BLOCK_Q else -(-t // BLOCK_Q) * BLOCK_Q


def block_sizes(tp: int) -> gpu_attention.BlockSizes:
  fwd, bwd = min(BLOCK_Q, tp), min(BLOCK_BWD, tp)
  return gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                  block_q_dq=bwd, block_kv_dq=bwd)


def attention(q_btnh, k_btgh, v_btgh, segment_ids_bt=None):
  """Causal attention [b, t, n, h] -> [b, t, n, h]; tokens attend within their segment."""
  b, t, n, h = q_btnh.shape
  r = n // k_btgh.shape[2]
  k_btnh = jnp.repeat(k_btgh, r, axis=2) if r > 1 else k_btgh
  v_btnh = jnp.repeat(v_btgh, r, axis=2) if r > 1 else v_btgh
  tp = padded_len(t)
  pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(a, pad) for a in (q_btnh, k_btnh, v_btnh))
  segs = None
  if segment_ids_bt is not None:  # padded positions: one more segment of their own
    segs = jnp.pad(segment_ids_bt.astype(jnp.int32), [(0, 0), (0, tp - t)],
                   constant_values=jnp.iinfo(jnp.int32).max)
  o = gpu_attention.mha(q, k, v, segs, sm_scale=h ** -0.5, causal=True,
                        block_sizes=block_sizes(tp), interpret=pallas_gmm.interpret())
  return o[:, :t]
