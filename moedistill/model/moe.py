"""MoE routing and dispatch: the one seam every expert parameterisation computes through.

Legend: t tokens, k experts per token, e experts, m token copies (t*k, sorted by expert),
c capacity slots per expert, d hidden, f expert intermediate.

`route` picks experts in float32 (softmax -> top-k -> optional renormalise), as transformers.
`make_dispatch(backend, ...)` returns an object with three methods:
  expand(a_td)       -> grouped copies of per-token rows (layout is the backend's business)
  gmm(a_g, w_edf)    -> per-expert matmul of grouped rows: row of expert e times w_edf[e]
  combine(y_g)       -> [t, d]: router-weighted sum over each token's k copies
Backends: `ragged` (jax.lax.ragged_dot over sorted copies, dropless, exact on CPU/TPU),
`sorted` (the same copies in one-expert row tiles, one batched matmul: exact, dropless, the CPU
path; padding rows are zero, p = buffer rows),
`capacity` (GShard [e, c, d] batched einsum; copies past capacity are dropped and counted),
`mgpu` (Hopper Mosaic-GPU grouped matmuls under a custom VJP, gmm.py), `ragged_vjp` (the
same custom-VJP wiring with the exact reference kernel, so CPU tests cover it),
and `pallas` (the `sorted` layout in power-of-two tiles of 16..64 rows through Pallas kernels for
the Triton lowering, pallas_gmm.py: exact, dropless, any GPU from Ampere on; interpret mode on
CPU).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from absl import logging

from moedistill.errors import ConfigError
from moedistill.model import gmm, pallas_gmm, resolve


def route(x_td, w_de, k: int, norm_topk_prob: bool):
  """Returns (router_logits_te f32, weights_tk f32, experts_tk int32)."""
  logits_te = jnp.dot(x_td.astype(jnp.float32), w_de.astype(jnp.float32))
  probs_te = jax.nn.softmax(logits_te, axis=-1)
  weights_tk, experts_tk = jax.lax.top_k(probs_te, k)
  if norm_topk_prob:
    weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
  return logits_te, weights_tk, experts_tk.astype(jnp.int32)


class RaggedDispatch:
  """Token copies sorted by expert; grouped matmul over the sorted rows. Never drops.
  kernel=None: jax.lax.ragged_dot under autodiff. A gmm.Kernel: gmm.grouped_matmul (custom
  VJP) and permutations whose backward is a gather (gmm.permute_rows)."""

  def __init__(self, experts_tk, weights_tk, num_experts: int, kernel=None):
    t, k = experts_tk.shape
    flat_m = experts_tk.reshape(-1)
    self.order_m = jnp.argsort(flat_m, stable=True)
    self.inverse_m = jnp.argsort(self.order_m)  # position of each (token, slot) copy
    self.token_m = self.order_m // k
    self.group_sizes = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
    self.weights_tk = weights_tk
    self.t, self.k, self.kernel = t, k, kernel
    self.dropped = jnp.zeros((), jnp.int32)

  def expand(self, a_td):
    if self.kernel is None:
      return a_td[self.token_m]
    return gmm.permute_rows(jnp.repeat(a_td, self.k, axis=0), self.order_m, self.inverse_m)

  def gmm(self, a_md, w_edf):
    if self.kernel is None:
      return jax.lax.ragged_dot(a_md, w_edf.astype(a_md.dtype), self.group_sizes)
    return gmm.grouped_matmul(a_md, w_edf, self.group_sizes, self.kernel)

  def combine(self, y_md):
    if self.kernel is None:
      y_tkd = y_md[self.inverse_m]
    else:
      y_tkd = gmm.permute_rows(y_md, self.inverse_m, self.order_m)
    y_tkd = y_tkd.reshape(self.t, self.k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd, self.weights_tk.astype(y_md.dtype))


class CapacityDispatch:
  """GShard layout [e, c, d]; first choices claim slots before second choices."""

  def __init__(self, experts_tk, weights_tk, num_experts: int, capacity_factor: float):
    t, k = experts_tk.shape
    m = t * k
    capacity = max(1, math.ceil(m / num_experts * capacity_factor))
    # Choice-major order (all first choices, then all second ...) so drops hit later choices.
    flat_m = experts_tk.T.reshape(-1)
    order = jnp.argsort(flat_m, stable=True)
    sizes = jnp.bincount(flat_m, length=num_experts)
    starts = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(m) - starts[flat_m[order]]
    rank_m = jnp.zeros((m,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    self.valid_m = rank_m < capacity
    # Slot e*c + rank; dropped copies point one past the end (scatter drops, gather fills 0).
    self.slot_m = jnp.where(self.valid_m, flat_m * capacity + rank_m, num_experts * capacity)
    self.token_m = jnp.tile(jnp.arange(t), k)
    self.weights_m = weights_tk.T.reshape(-1)
    self.e, self.c, self.t, self.k = num_experts, capacity, t, k
    self.dropped = jnp.sum(~self.valid_m).astype(jnp.int32)

  def expand(self, a_td):
    buf = jnp.zeros((self.e * self.c, a_td.shape[-1]), a_td.dtype)
    buf = buf.at[self.slot_m].set(a_td[self.token_m], mode="drop")
    return buf.reshape(self.e, self.c, -1)

  def gmm(self, a_ecd, w_edf):
    return jnp.einsum("ecd,edf->ecf", a_ecd, w_edf.astype(a_ecd.dtype))

  def combine(self, y_ecd):
    y_md = y_ecd.reshape(self.e * self.c, -1).at[self.slot_m].get(mode="fill", fill_value=0)
    y_md = y_md * self.weights_m[:, None].astype(y_md.dtype)
    return jnp.zeros((self.t, y_md.shape[-1]), y_md.dtype).at[self.token_m].add(y_md)


class SortedDispatch:
  """Exact and dropless, for CPU. Copies sorted by expert go to a buffer where each expert's
  rows start on a tile boundary, so each tile of `tile` rows belongs to one expert and the
  grouped matmul is one batched matmul over tiles (gmm.tiled_matmul). Rows: at most
  m + e * (tile - 1), so work and temporaries ~ routed copies x d x f, where XLA:CPU's
  ragged_dot is a dense masked matmul (~ m x e x f). Rows move by gathers in both directions.
  skip_empty: rows with id num_experts are padding (expert parallelism's worst-case receive
  buffer); the matmul skips the tiles past the real experts' at run time (gmm.tiled_matmul_live)."""

  def __init__(self, experts_tk, weights_tk, num_experts: int, tile: int | None = None,
               skip_empty: bool = False):
    t, k = experts_tk.shape
    m = t * k
    tile = tile or sorted_tile(m, num_experts)
    n_tiles = m // tile + min(num_experts, m)  # sum over e of ceil(size_e / tile), at most
    flat_m = experts_tk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True)
    sizes_e = jnp.bincount(flat_m, length=num_experts)
    tiles_e = -(-sizes_e // tile)
    tile_end_e = jnp.cumsum(tiles_e)
    # First buffer row minus first sorted copy of each expert: the padding before it.
    pad_e = (tile_end_e - tiles_e) * tile - (jnp.cumsum(sizes_e) - sizes_e)
    sorted_e = flat_m[order_m]
    pos_m = jnp.zeros((m,), jnp.int32).at[order_m].set(
        (jnp.arange(m) + pad_e[sorted_e]).astype(jnp.int32))  # buffer row of each copy
    copy_p = jnp.full((n_tiles * tile,), m, jnp.int32).at[pos_m].set(jnp.arange(m))
    self.pos_m, self.copy_p, self.t, self.k = pos_m, copy_p, t, k
    # Tiles past the used ones hold zero rows; they take the last expert.
    self.tile_expert = jnp.minimum(
        jnp.searchsorted(tile_end_e, jnp.arange(n_tiles), side="right"), num_experts - 1)
    self.used_tiles = tile_end_e[-1]  # tiles from here on hold no copies
    self.live = self.used_tiles if skip_empty else None
    self.weights_tk = weights_tk
    self.dropped = jnp.zeros((), jnp.int32)

  def expand(self, a_td):
    return gmm.gather_rows(a_td, self.copy_p // self.k, self.pos_m.reshape(self.t, self.k))

  def gmm(self, a_pd, w_edf):
    if self.live is not None:
      return gmm.tiled_matmul_live(a_pd, w_edf, self.tile_expert, self.live)
    return gmm.tiled_matmul(a_pd, w_edf, self.tile_expert)

  def combine(self, y_pd):
    y_tkd = gmm.gather_rows(y_pd, self.pos_m, self.copy_p[:, None]).reshape(self.t, self.k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd, self.weights_tk.astype(y_pd.dtype))


class PallasDispatch(SortedDispatch):
  """`sorted`'s buffer in tiles of pallas_gmm.row_tile rows (powers of two >= 16, as Triton's
  dot needs); the grouped matmul is pallas_gmm.gmm, whose programs on tiles past the used ones
  write zeros without computing (whether or not skip_empty)."""

  def __init__(self, experts_tk, weights_tk, num_experts: int, skip_empty: bool = False):
    t, k = experts_tk.shape
    super().__init__(experts_tk, weights_tk, num_experts, pallas_gmm.row_tile(t * k, num_experts),
                     skip_empty)

  def gmm(self, a_pd, w_edf):
    return pallas_gmm.gmm(a_pd, w_edf, self.tile_expert, self.used_tiles)


def sorted_tile(m: int, num_experts: int) -> int:
  """Rows per tile: 32 (at 8192 copies x 128 experts, 32 and 64 were within noise of each
  other and well ahead of 8 and 16: python -m benchmarks.moe_cpu --tiles); smaller when experts
  get few copies each, so padding stays below the copies."""
  return max(8, min(32, 1 << max(0, (m // num_experts).bit_length() - 1)))


BACKENDS = ("ragged", "sorted", "capacity", "ragged_vjp", "mgpu", "pallas")
_LOGGED: set[str] = set()  # each reason for passing over a faster path, logged once


def resolve_backend(name: str, cfg=None, comp=None) -> str:
  """`auto`: what resolve.resolve picks for the target device (resolve.target(): this host,
  or what `plan --platform` lowers for) and this model's grouped-matmul shapes (cfg, comp;
  without cfg they are unknown and `mgpu` is not chosen). Never `capacity`."""
  return name if name != "auto" else _resolved(cfg, comp).moe_backend


def _resolved(cfg, comp, dtype=jnp.bfloat16):
  t = resolve.target()
  r = resolve.resolve(t.platform, t.device_kind,
                      None if cfg is None else resolve.gmm_shapes(cfg, comp), jnp.dtype(dtype).name)
  if r.why and r.why not in _LOGGED:  # a warning: the CLIs show warnings and up on stderr
    _LOGGED.add(r.why)
    logging.warning(r.why)
  return r


def resolve_runtime(rt, cfg=None, comp=None):
  """The Runtime a model computes with: `auto` moe_backend and attention replaced by what
  the target device runs for this model's shapes (resolve.resolve); attention stays `auto`
  where that means plain or blocked by row length (decided per call)."""
  if rt.moe_backend != "auto" and rt.attention != "auto":
    return rt
  r = _resolved(cfg, comp, rt.dtype)
  return dataclasses.replace(
      rt, moe_backend=r.moe_backend if rt.moe_backend == "auto" else rt.moe_backend,
      attention=r.attention if rt.attention == "auto" else rt.attention)


def make_dispatch(backend: str, experts_tk, weights_tk, num_experts: int,
                  capacity_factor: float = 1.25, skip_empty: bool = False):
  """skip_empty: ids num_experts mark padding rows whose work `sorted` skips at run time."""
  if backend == "ragged":
    return RaggedDispatch(experts_tk, weights_tk, num_experts)
  if backend == "sorted":
    return SortedDispatch(experts_tk, weights_tk, num_experts, skip_empty=skip_empty)
  if backend == "pallas":  # Triton-lowered Pallas kernels; interpret mode on CPU
    return PallasDispatch(experts_tk, weights_tk, num_experts, skip_empty=skip_empty)
  if backend == "ragged_vjp":  # the mgpu wiring with the exact reference kernel (any device)
    return RaggedDispatch(experts_tk, weights_tk, num_experts, gmm.ReferenceKernel())
  if backend == "mgpu":
    return RaggedDispatch(experts_tk, weights_tk, num_experts, gmm.MosaicGpuKernel())
  if backend == "capacity":
    return CapacityDispatch(experts_tk, weights_tk, num_experts, capacity_factor)
  raise ConfigError(f"moe backend={backend!r}: expected one of {BACKENDS}")


def expert_ffn(dispatch, x_td, w_gate_edf, w_up_edf, w_down_efd):
  """SwiGLU experts: sum_k w_k * down_e(silu(gate_e x) * up_e x); gate and up run as one
  grouped matmul over [e, d, 2f]."""
  x_g = dispatch.expand(x_td)
  f = w_gate_edf.shape[-1]
  gu = dispatch.gmm(x_g, jnp.concatenate([w_gate_edf, w_up_edf], axis=-1))
  h_g = jax.nn.silu(gu[..., :f]) * gu[..., f:]
  return dispatch.combine(dispatch.gmm(h_g, w_down_efd))
