"""Grouped matmul with a custom VJP over swappable kernels, and gather-only permutations.

Legend: m sorted token copies, d in features, f out features, e groups (experts).
  y[m, f]    = x[m, d] @ w[e(m), d, f]                      kernel.gmm
  dx[m, d]   = dy[m, f] @ w[e(m)]^T                         kernel.gmm_t (transpose_rhs)
  dw[e, d, f] = sum over rows of group e of x^T dy          kernel.tgmm
Kernels: `ReferenceKernel` (jax.lax.ragged_dot / ragged_dot_general: exact, any backend;
the CPU stand-in that tests the VJP wiring) and `MosaicGpuKernel` (Hopper Pallas kernels from
jax.experimental.pallas.ops.gpu; rows padded to the tile). Default ragged_dot is never used
on GPU: it lowers to a dense masked matmul there (DESIGN.md), and on CPU too (at 8192 copies
x 128 experts it costs ~130x the ideal FLOPs), so CPU uses `tiled_matmul` over rows that
moe.SortedDispatch lays out in one-expert tiles, moved by gather-only `gather_rows`.
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
