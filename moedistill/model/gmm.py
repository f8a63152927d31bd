"""Grouped matmul with a custom VJP over swappable kernels, and gather-only permutations.

Legend: m sorted token copies, d in features, f out features, e groups (experts).
  y[m, f]    = x[m, d] @ w[e(m), d, f]                      kernel.gmm
  dx[m, d]   = dy[m, f] @ w[e(m)]^T                         kernel.gmm_t (transpose_rhs)
  dw[e, d, f] = sum over rows of group e of x^T dy          kernel.tgmm
Kernels: `ReferenceKernel` (jax.lax.ragged_dot / ragged_dot_general: exact, any backend;
the CPU stand-in that tests the VJP wiring) and `MosaicGpuKernel` (Hopper Pallas kernels from
jax.experimental.pallas.ops.gpu; rows padded to the tile). Default ragged_dot is never used
on GPU: it lowers to a dense masked matmul there (docs/design.md, "MoE dispatch"), and on
CPU too (at 8192 copies x 128 experts it costs ~130x the ideal FLOPs), so CPU uses `tiled_matmul` over rows that
moe.SortedDispatch lays out in one-expert tiles, moved by gather-only `gather_rows`;
`tiled_matmul_live` skips at run time the tiles past a count (expert parallelism's worst-case
receive buffer holds far fewer rows than its size).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


class ReferenceKernel:
  name = "reference"

  def gmm(self, x, w, gs):
    return jax.lax.ragged_dot(x, w, gs)

  def gmm_t(self, dy, w, gs):
    return jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), gs)

  def tgmm(self, x, dy, gs):
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x, dy, gs, ragged_dot_dimension_numbers=dims)


@dataclasses.dataclass(frozen=True)
class Tiles:
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 1


@dataclasses.dataclass(frozen=True)
class MosaicGpuKernel:
  """Hopper (sm90) kernels. Tiles are per call kind; defaults are the kernels' own examples
  until scripts/bench.py --tune records better ones for the 30B-A3B shapes."""
  fwd: Tiles = Tiles()
  bwd_dx: Tiles = Tiles()
  bwd_dw: Tiles = Tiles(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)
  name = "mgpu"

  def _pad(self, x, gs, block):
    pad = -x.shape[0] % block
    if pad:  # extra zero rows join the last group; their outputs are sliced off
      x = jnp.pad(x, ((0, pad), (0, 0)))
      gs = gs.at[-1].add(pad)
    return x, gs, pad

  def gmm(self, x, w, gs, transpose_rhs=False, tiles=None):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    t = tiles or self.fwd
    xp, gsp, pad = self._pad(x, gs, t.block_m)
    y = ragged_dot_mgpu.ragged_dot(xp, w.astype(x.dtype), group_sizes=gsp,
                                   transpose_rhs=transpose_rhs, **dataclasses.asdict(t))
    return y[: x.shape[0]]

  def gmm_t(self, dy, w, gs):
    return self.gmm(dy, w, gs, transpose_rhs=True, tiles=self.bwd_dx)

  def tgmm(self, x, dy, gs):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy.astype(x.dtype), group_sizes=gs, **dataclasses.asdict(self.bwd_dw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x_md, w_edf, group_sizes, kernel):
  return kernel.gmm(x_md, w_edf.astype(x_md.dtype), group_sizes)


def _gmm_fwd(x_md, w_edf, group_sizes, kernel):
  return kernel.gmm(x_md, w_edf.astype(x_md.dtype), group_sizes), (x_md, w_edf, group_sizes)


def _gmm_bwd(kernel, res, dy_mf):
  x_md, w_edf, gs = res
  dx = kernel.gmm_t(dy_mf.astype(x_md.dtype), w_edf.astype(x_md.dtype), gs)
  dw = kernel.tgmm(x_md, dy_mf.astype(x_md.dtype), gs)
  return dx.astype(x_md.dtype), dw.astype(w_edf.dtype), None


grouped_matmul.defvjp(_gmm_fwd, _gmm_bwd)


def tiled_matmul(x_pd, w_edf, tile_expert_n):
  """Grouped matmul over rows laid out in tiles that each belong to one expert: tile i of
  x_pd ([n tiles * tile, d]) times w_edf[tile_expert_n[i]], as one batched matmul. Autodiff's
  dW sums the [n, d, f] per-tile products into their experts."""
  n = tile_expert_n.shape[0]
  x_ntd = x_pd.reshape(n, -1, x_pd.shape[-1])
  y_ntf = jnp.einsum("ntd,ndf->ntf", x_ntd, w_edf.astype(x_pd.dtype)[tile_expert_n])
  return y_ntf.reshape(x_pd.shape[0], -1)


LIVE_CHUNK_ROWS = 512  # rows per skippable chunk: coarse enough that the loop costs nothing


def _chunk_tiles(x_pd, tile_expert_n) -> int:
  n = tile_expert_n.shape[0]
  return min(n, max(1, LIVE_CHUNK_ROWS // (x_pd.shape[0] // n)))


def _chunks(x_pd, tile_expert_n, g):
  """[c, g, tile, d] chunks of g tiles (zero tiles appended to fill the last) and their experts."""
  n = tile_expert_n.shape[0]
  pad = -n % g
  x_ntd = x_pd.reshape(n, -1, x_pd.shape[-1])
  x_ntd = jnp.pad(x_ntd, ((0, pad), (0, 0), (0, 0)))
  te = jnp.pad(tile_expert_n, (0, pad))
  return x_ntd.reshape(-1, g, *x_ntd.shape[1:]), te.reshape(-1, g)


def _live_fwd_loop(x_pd, w_edf, tile_expert_n, live):
  g = _chunk_tiles(x_pd, tile_expert_n)
  x_cgtd, te_cg = _chunks(x_pd, tile_expert_n, g)
  w = w_edf.astype(x_pd.dtype)
  axes = _varying_axes(x_pd, w)

  def body(_, inp):
    i, x_gtd, te_g = inp
    y = jax.lax.cond(i * g < live,
                     lambda: _vary(jnp.einsum("gtd,gdf->gtf", x_gtd, w[te_g]), axes),
                     lambda: _vary(jnp.zeros((*x_gtd.shape[:2], w.shape[-1]), x_gtd.dtype), axes))
    return None, y

  _, y = jax.lax.scan(body, None, (jnp.arange(te_cg.shape[0]), x_cgtd, te_cg))
  return y.reshape(-1, w.shape[-1])[: x_pd.shape[0]]


@jax.custom_vjp
def tiled_matmul_live(x_pd, w_edf, tile_expert_n, live):
  """tiled_matmul where only the first `live` tiles hold rows (a run-time count): chunks of
  tiles past it are skipped by lax.cond in a scan, forward and backward, so a worst-case-sized
  buffer (expert parallelism's receive buffer) costs the rows it got, not its size. Rows of
  skipped tiles read as zero outputs. Its own VJP: autodiff would add a whole [e, d, f]
  gradient into the loop carry on every chunk, skipped or not."""
  return _live_fwd_loop(x_pd, w_edf, tile_expert_n, live)


def _live_fwd(x_pd, w_edf, tile_expert_n, live):
  return _live_fwd_loop(x_pd, w_edf, tile_expert_n, live), (x_pd, w_edf, tile_expert_n, live)


def _live_bwd(res, dy_pf):
  x_pd, w_edf, tile_expert_n, live = res
  g = _chunk_tiles(x_pd, tile_expert_n)
  x_cgtd, te_cg = _chunks(x_pd, tile_expert_n, g)
  dy_cgtf, _ = _chunks(dy_pf.astype(x_pd.dtype), tile_expert_n, g)
  w = w_edf.astype(x_pd.dtype)
  axes = _varying_axes(x_pd, w, dy_pf)

  def live_chunk(dw, x_gtd, dy_gtf, te_g):
    dx = jnp.einsum("gtf,gdf->gtd", dy_gtf, w[te_g])
    dw_g = jnp.einsum("gtd,gtf->gdf", x_gtd, dy_gtf, preferred_element_type=jnp.float32)
    return dw.at[te_g].add(dw_g), _vary(dx, axes)

  def skipped_chunk(dw, x_gtd, dy_gtf, te_g):
    return dw, _vary(jnp.zeros_like(x_gtd), axes)

  def body(dw, inp):
    i, x_gtd, dy_gtf, te_g = inp
    return jax.lax.cond(i * g < live, live_chunk, skipped_chunk, dw, x_gtd, dy_gtf, te_g)

  dw0 = _vary(jnp.zeros(w_edf.shape, jnp.float32), axes)
  dw, dx = jax.lax.scan(body, dw0, (jnp.arange(te_cg.shape[0]), x_cgtd, dy_cgtf, te_cg))
  dx = dx.reshape(-1, x_pd.shape[-1])[: x_pd.shape[0]]
  return _typed_as(dx, x_pd), _typed_as(dw.astype(w_edf.dtype), w_edf), None, None


tiled_matmul_live.defvjp(_live_fwd, _live_bwd)


def _varying_axes(*refs) -> frozenset:
  """The manual (shard_map) axes any of refs varies over; empty outside shard_map."""
  return frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))


def _vary(z, axes):
  """z marked varying over `axes`: loop carries and cond branches must agree on that type."""
  missing = tuple(sorted(axes - _varying_axes(z)))
  return jax.lax.pcast(z, missing, to="varying") if missing else z


def _typed_as(ct, primal):
  """A cotangent with its primal's varying axes: summed over the axes only the cotangent varies
  over (the transpose of the implicit pcast where the primal met a varying operand)."""
  extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
  return _vary(jax.lax.psum(ct, extra) if extra else ct, _varying_axes(primal))


@jax.custom_vjp
def gather_rows(x, idx, back_idx):
  """x[idx], rows of idx past the end of x reading 0. back_idx[i, :] lists the output rows that
  read row i (entries past the end: none), so the backward is a gather and a sum, not the
  scatter-add autodiff would emit (a serial loop on XLA:CPU)."""
  return x.at[idx].get(mode="fill", fill_value=0)


def _gather_fwd(x, idx, back_idx):
  return gather_rows(x, idx, back_idx), back_idx


def _gather_bwd(back_idx, ct):
  return ct.at[back_idx].get(mode="fill", fill_value=0).sum(axis=1), None, None


gather_rows.defvjp(_gather_fwd, _gather_bwd)


@jax.custom_vjp
def permute_rows(x, idx, inverse):
  """x[idx] for a permutation idx whose inverse is `inverse`: the backward is the gather
  ct[inverse], not a scatter-add."""
  return x[idx]


def _perm_fwd(x, idx, inverse):
  return x[idx], (idx, inverse)


def _perm_bwd(res, ct):
  idx, inverse = res
  return ct[inverse], None, None


permute_rows.defvjp(_perm_fwd, _perm_bwd)


def is_hopper() -> bool:
  try:
    d = jax.devices()[0]
  except RuntimeError:
    return False
  return d.platform == "gpu" and getattr(d, "compute_capability", "") in ("9.0", "9.0a")
