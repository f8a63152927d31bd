"""Grouped matmul for `moe_backend=pallas`: Pallas kernels written for the Triton lowering (NVIDIA
GPUs from Ampere on) that run unchanged on CPU in Pallas interpret mode.

Layout (moe.SortedDispatch's buffer): rows [p, k] in tiles of `tm` rows, tile i holding rows of
expert te[i] only; tiles from `live` on hold no copies (pure padding).
Legend: p buffer rows (n tiles * tm), k in features, f out features, e experts.
  y[p, f]      = x[p, k] @ w[te, k, f]            _mm_kernel, grid (row tiles, f blocks)
  dx[p, k]     = dy[p, f] @ w[te, k, f]^T         _mm_kernel with transpose_rhs (w read as is)
  dw[e, k, f]  = sum over e's tiles of x^T dy     _tmm_kernel, grid (experts, k blocks, f blocks)
Every dot accumulates in float32 over blocks of the contracted dim; programs on tiles past
`live` write zeros without reading anything. dw loops over exactly its expert's tile range
(te is non-decreasing), so it is one exact sum per expert and never forms per-row or per-tile
weight copies. Contracted and output feature dims are zero-padded to their blocks in the
wrapper (zeros add nothing to a dot; padded outputs are sliced off), so any shape works,
rank 4 included.
Block sizes are powers of two >= 16: Triton's load/store need power-of-two tensors and its
dot needs every dim >= 16. BLOCK caps them at 64 (64x64 f32 accumulators fit a CTA's
registers at 4 warps; not tuned on a GPU, none was available).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Under shard_map: the manual axes arrays vary over, and cotangents typed as their primals.
from moedistill.model.gmm import _typed_as, _vary, _varying_axes

BLOCK = 64  # largest block along k and f
MIN_BLOCK = 16  # Triton's dot needs M, N, K >= 16


_INTERPRET: list[bool] = []  # innermost `triton_lowering()` override, if any


def interpret() -> bool:
  """Pallas interpret mode where no Triton lowering exists: on CPU the kernels run as XLA
  loops over their grid (same kernel code, exact, slow). Inside `triton_lowering()`: never."""
  return _INTERPRET[-1] if _INTERPRET else jax.default_backend() == "cpu"


@contextlib.contextmanager
def triton_lowering():
  """Trace the kernels for the Triton lowering even on CPU, to lower them for CUDA from a
  machine without a GPU (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`)."""
  _INTERPRET.append(False)
  try:
    yield
  finally:
    _INTERPRET.pop()


def block_for(dim: int, cap: int = BLOCK) -> int:
  """Smallest power of two >= dim, within [MIN_BLOCK, cap]."""
  return min(cap, max(MIN_BLOCK, pl.next_power_of_2(dim)))


def row_tile(m: int, num_experts: int) -> int:
  """Rows per tile of the sorted buffer: the power of two at most the mean copies per expert,
  clamped to [16, 64], so padding (< one tile per expert) stays small against the copies."""
  return max(MIN_BLOCK, min(BLOCK, 1 << max(0, (m // num_experts).bit_length() - 1)))


def _pad_to(x, axis: int, block: int):
  pad = -x.shape[axis] % block
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _call(kernel, out_shape, dtype, args, **kw):
  """pl.pallas_call over `args`. Under shard_map every operand is marked varying over the
  manual axes any of them varies over, and so is the output (pallas_call needs its output's
  type spelled out there)."""
  axes = _varying_axes(*args)
  out = jax.ShapeDtypeStruct(out_shape, dtype,
                             manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
  return pl.pallas_call(
      kernel, out_shape=out, interpret=interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), **kw,
  )(*(_vary(a, axes) for a in args))


def _mm_kernel(te_ref, live_ref, a_ref, w_ref, o_ref, *, bc, nc, transpose_rhs):
  """One (row tile, out block): o = a_tile @ w[e] (w[e]^T with transpose_rhs) in float32."""
  i, j = pl.program_id(0), pl.program_id(1)
  bo = o_ref.shape[1]

  @pl.when(i < live_ref[0])
  def _():
    e = te_ref[0]

    def body(c, acc):
      a = a_ref[:, pl.ds(c * bc, bc)]
      if transpose_rhs:  # w[e] is [out, contracted]
        return acc + plgpu.dot(a, w_ref[e, pl.ds(j * bo, bo), pl.ds(c * bc, bc)], trans_b=True)
      return acc + plgpu.dot(a, w_ref[e, pl.ds(c * bc, bc), pl.ds(j * bo, bo)])

    acc = jax.lax.fori_loop(0, nc, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  @pl.when(i >= live_ref[0])
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _tiled_mm(a_pc, w, tile_expert_n, live, *, transpose_rhs: bool):
  """[p, c] rows times w[te] -> [p, o]. w is [e, c, o], or [e, o, c] with transpose_rhs."""
  p, c = a_pc.shape
  n = tile_expert_n.shape[0]
  tm = p // n
  o = w.shape[1] if transpose_rhs else w.shape[2]
  bc, bo = block_for(c), block_for(o)
  a = _pad_to(a_pc, 1, bc)
  w = _pad_to(_pad_to(w.astype(a_pc.dtype), 1, bo if transpose_rhs else bc), 2,
              bc if transpose_rhs else bo)
  cp = a.shape[1]
  op = w.shape[1] if transpose_rhs else w.shape[2]
  out = _call(
      functools.partial(_mm_kernel, bc=bc, nc=cp // bc, transpose_rhs=transpose_rhs),
      (p, op), a_pc.dtype,
      (tile_expert_n.astype(jnp.int32), jnp.reshape(live, (1,)).astype(jnp.int32), a, w),
      grid=(n, op // bo),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)),
                pl.BlockSpec((1,), lambda i, j: (0,)),
                pl.BlockSpec((tm, cp), lambda i, j: (i, 0)),
                pl.BlockSpec(w.shape, lambda i, j: (0, 0, 0))],
      out_specs=pl.BlockSpec((tm, bo), lambda i, j: (i, j)),
      name="gmm_dx" if transpose_rhs else "gmm")
  return out[:, :o]


def _tmm_kernel(start_ref, end_ref, x_ref, dy_ref, o_ref, *, tm):
  """One (expert, k block, f block): sum over the expert's tiles of x_tile^T dy_tile."""
  kb, fb = pl.program_id(1), pl.program_id(2)
  bk, bf = o_ref.shape

  def body(t, acc):
    x = x_ref[pl.ds(t * tm, tm), pl.ds(kb * bk, bk)]
    dy = dy_ref[pl.ds(t * tm, tm), pl.ds(fb * bf, bf)]
    return acc + plgpu.dot(x, dy, trans_a=True)

  acc = jax.lax.fori_loop(start_ref[0], end_ref[0], body, jnp.zeros((bk, bf), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _expert_tiles(tile_expert_n, live, num_experts: int):
  """[start, end) tile range of each expert among the first `live` tiles (te non-decreasing);
  empty for experts without rows."""
  ids = jnp.arange(num_experts, dtype=tile_expert_n.dtype)
  end = jnp.minimum(jnp.searchsorted(tile_expert_n, ids, side="right"), live)
  start = jnp.minimum(jnp.searchsorted(tile_expert_n, ids, side="left"), end)
  return start.astype(jnp.int32), end.astype(jnp.int32)


def _tiled_tmm(x_pk, dy_pf, tile_expert_n, live, num_experts: int):
  """dw [e, k, f] float32: per expert, the sum of x_tile^T dy_tile over its live tiles."""
  p, k = x_pk.shape
  f = dy_pf.shape[1]
  tm = p // tile_expert_n.shape[0]
  bk, bf = block_for(k), block_for(f)
  x = _pad_to(x_pk, 1, bk)
  dy = _pad_to(dy_pf.astype(x_pk.dtype), 1, bf)
  kp, fp = x.shape[1], dy.shape[1]
  start, end = _expert_tiles(tile_expert_n, live, num_experts)
  out = _call(
      functools.partial(_tmm_kernel, tm=tm), (num_experts, kp, fp), jnp.float32,
      (start, end, x, dy),
      grid=(num_experts, kp // bk, fp // bf),
      in_specs=[pl.BlockSpec((1,), lambda e, i, j: (e,)),
                pl.BlockSpec((1,), lambda e, i, j: (e,)),
                pl.BlockSpec((p, kp), lambda e, i, j: (0, 0)),
                pl.BlockSpec((p, fp), lambda e, i, j: (0, 0))],
      out_specs=pl.BlockSpec((None, bk, bf), lambda e, i, j: (e, i, j)),
      name="gmm_dw")
  return out[:, :k, :f]


def _check(x_pk, tile_expert_n):
  p, n = x_pk.shape[0], tile_expert_n.shape[0]
  tm = p // max(n, 1)
  if n == 0 or tm * n != p or tm < MIN_BLOCK or tm & (tm - 1):
    raise ValueError(f"pallas gmm: {p} rows in {n} tiles; expected tiles of a power of two "
                     f">= {MIN_BLOCK} rows (Triton's dot)")


@jax.custom_vjp
def gmm(x_pk, w_ekf, tile_expert_n, live):
  """Rows of tile i of x_pk ([n tiles * tm, k]) times w_ekf[tile_expert_n[i]], computed in
  x's dtype with float32 accumulation; rows of tiles from `live` on read as zeros. w is cast
  to x's dtype, as the other backends do."""
  _check(x_pk, tile_expert_n)
  return _tiled_mm(x_pk, w_ekf, tile_expert_n, live, transpose_rhs=False)


def _gmm_fwd(x_pk, w_ekf, tile_expert_n, live):
  return gmm(x_pk, w_ekf, tile_expert_n, live), (x_pk, w_ekf, tile_expert_n, live)


def _gmm_bwd(res, dy_pf):
  x_pk, w_ekf, tile_expert_n, live = res
  dy = dy_pf.astype(x_pk.dtype)
  dx = _tiled_mm(dy, w_ekf, tile_expert_n, live, transpose_rhs=True)
  dw = _tiled_tmm(x_pk, dy, tile_expert_n, live, w_ekf.shape[0])
  return (_typed_as(dx.astype(x_pk.dtype), x_pk), _typed_as(dw.astype(w_ekf.dtype), w_ekf),
          None, None)


gmm.defvjp(_gmm_fwd, _gmm_bwd)
