"""Building blocks shared by the teacher and the compressed student: params, norm, linear, RoPE.

Params carry `logical_axes` metadata (names, not meshes): moedistill.sharding maps them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How to compute (not what): lives in the graphdef, never in checkpoints."""
  dtype: jnp.dtype = jnp.float32          # compute dtype
  param_dtype: jnp.dtype = jnp.float32
  moe_backend: str = "auto"  # resolved per platform and shapes by moe.resolve_runtime
  capacity_factor: float = 1.25
  # Expert parallelism with a dropless backend: all-to-all buffer per destination, in multiples
  # of the even share (tokens * k / expert axis); 0 = the worst case, nothing ever drops.
  ep_capacity_factor: float = 0.0
  remat: str = "none"  # a REMAT_POLICIES key: what each decoder layer saves for the backward
  attention: str = "auto"  # auto | plain | blocked | cudnn (moedistill.model.attention)
  attention_block: int = 512  # query and key block of blocked attention; auto blocks longer rows
  scan_layers: bool = False  # one layer body scanned over stacked params (benchmarks/compile.py)


# Activation memory vs recompute, per decoder layer (jax.checkpoint policies):
#   none: autodiff saves every intermediate; full: saves only the layer's inputs and recomputes
#   the layer in the backward; dots: saves the outputs of matmuls without batch dims (q/k/v/o,
#   router, dense-MLP projections) and recomputes norms, RoPE, activations, attention scores
#   and the expert matmuls (ragged dots and per-expert batched einsums).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs | None, shape, axes, rt: Runtime, init: str = "normal") -> nnx.Param:
  if init == "ones":
    value = jnp.ones(shape, rt.param_dtype)
  elif init == "zeros" or rngs is None:
    value = jnp.zeros(shape, rt.param_dtype)
  else:
    value = INIT_STD * jax.random.normal(rngs.params(), shape, rt.param_dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, rt: Runtime):
    self.scale = param(None, (dim,), ("norm",), rt, init="ones")
    self.eps, self.rt = eps, rt

  def __call__(self, x):
    # As transformers: normalise in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.rt.dtype) * x32.astype(self.rt.dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of torch's weight)."""

  def __init__(self, din: int, dout: int, axes, rt: Runtime, rngs: nnx.Rngs, bias: bool = False):
    self.kernel = param(rngs, (din, dout), axes, rt)
    self.bias = param(None, (dout,), axes[1:], rt, init="zeros") if bias else None
    self.rt = rt

  def __call__(self, x):
    y = jnp.dot(x.astype(self.rt.dtype), self.kernel[...].astype(self.rt.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.rt.dtype)
    return y


def rope(x_btnh, positions_bt, theta: float):
  """Rotate-half RoPE exactly as transformers: cos/sin in float32, applied in x's dtype."""
  h = x_btnh.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_btnh.dtype), jnp.sin(emb).astype(x_btnh.dtype)
  x1, x2 = x_btnh[..., : h // 2], x_btnh[..., h // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_btnh * cos + rotated * sin


def positions_from_segments(segment_ids_bt):
  """Positions restart at 0 where the segment id changes, so a packed document sees the
  same positions as it would alone."""
  t = segment_ids_bt.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_bt[:, :1], bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]],
      axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx
