"""Expert parallelism: the MoE block under `jax.shard_map`; token copies travel to their experts.

Legend: b rows, s positions, t local tokens (b*s of one batch shard), k experts per token,
E experts, n size of the `expert` mesh axis, el = E / n experts held per device, m = t*k local
token copies, B per-destination buffer rows, R = n*B received rows, d hidden, w row width.

Layout (MaxText's dropless MoE, written for our dispatch seam):
  tokens stay on their batch shard (data x fsdp x expert); routing and the sort by expert are
  local; expert weights enter split over `expert` (and over `tensor` on their intermediate
  dim), are all-gathered over `fsdp` inside (FSDP: the backward reduce-scatters their grads);
  sorted copies go to the device holding their expert, are regrouped there by local expert,
  run through the chosen backend's grouped matmul and come back the same way.
Transport: `jax.lax.ragged_all_to_all` off CPU; XLA:CPU (jax 0.10) has no ragged-all-to-all,
so on CPU a padded `all_to_all` of [n, B] slots whose valid prefix per source comes from an
exchanged count. B = t*min(k, el), the most copies one device can send one destination, so
the path never drops; the `sorted` backend skips the buffer's empty tiles at run time. The
`capacity` backend keeps its GShard contract instead: [E, c] slots per shard (c from
capacity_factor, overflow counted), exchanged with one tiled all_to_all.
The expert intermediate dim split over `tensor` leaves partial sums: one psum at the end.

With no mesh or a one-device mesh the block runs exactly the one-device code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moedistill.errors import ConfigError
from moedistill.model import moe, pallas_gmm
from moedistill.sharding import BATCH_AXES, spec_for

AXIS = "expert"


def active_mesh():
  """The abstract mesh of the enclosing `jax.set_mesh`, or None: run the one-device code."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or AXIS not in mesh.axis_names:
    return None
  return mesh


def check(num_experts: int, mesh, rows: int | None = None, ep_capacity_factor: float = 0.0):
  """Bad layouts, one line each, before anything compiles."""
  f = ep_capacity_factor
  if f < 0 or 0 < f < 1:
    raise ConfigError(f"ep_capacity_factor={f}: expected 0 (dropless) or >= 1 (buffers of that "
                      "many even shares; below 1 copies drop even when routing is even)")
  n = mesh.shape[AXIS]
  if num_experts % n:
    raise ConfigError(f"mesh.expert={n}: expected a divisor of num_experts={num_experts}")
  shards = 1
  for a in BATCH_AXES:
    shards *= mesh.shape[a]
  if rows is not None and rows % shards:
    raise ConfigError(f"MoE batch of {rows} rows: expected a multiple of the mesh's {shards} "
                      "batch shards (data x fsdp x expert)")


def ragged_transport() -> bool:
  """jax.lax.ragged_all_to_all where XLA implements it (not XLA:CPU in jax 0.10)."""
  return jax.default_backend() != "cpu"


class RaggedExchange:
  """Sort locally, send each expert's copies to its device, regroup them there by local expert
  (padding rows get id el: past every group, so the grouped matmul skips them). Buffers of
  B = t*min(k, el) rows per destination never drop; `ep_capacity_factor` f > 0 bounds B at
  ceil(f*t*k/n): a destination's copies past B (its last experts') drop and are counted."""

  def __init__(self, experts_tk, weights_tk, num_experts: int, n: int, backend: str,
               ep_capacity_factor: float = 0.0):
    t, k = experts_tk.shape
    el = num_experts // n
    self.outer = moe.RaggedDispatch(experts_tk, weights_tk, num_experts)  # sort, unsort, sum
    counts_ne = self.outer.group_sizes.reshape(n, el)
    self.n, self.m, self.bound = n, t * k, t * min(k, el)
    if ep_capacity_factor:
      self.bound = min(self.bound, math.ceil(ep_capacity_factor * t * k / n))
    sent_n = counts_ne.sum(1)
    self.start_n = jnp.cumsum(sent_n) - sent_n
    self.send_n = jnp.minimum(sent_n, self.bound)
    dest_m = jnp.sort(experts_tk.reshape(-1)) // el
    pos_m = jnp.arange(self.m) - self.start_n[dest_m]
    self.slot_m = jnp.where(pos_m < self.bound, dest_m * self.bound + pos_m, n * self.bound)
    self.dropped = jnp.sum(pos_m >= self.bound).astype(jnp.int32)
    recv_ne = jax.lax.all_to_all(counts_ne, AXIS, 0, 0)  # row s: copies source s sends me
    self.recv_n = jnp.minimum(recv_ne.sum(1), self.bound)
    ends = jnp.cumsum(recv_ne, axis=1)
    local_sb = jnp.sum(jnp.arange(self.bound)[None, :, None] >= ends[:, None, :], axis=-1)
    ones = jnp.ones((n * self.bound, 1), jnp.float32)
    self.local = moe.make_dispatch(backend, local_sb.reshape(-1, 1).astype(jnp.int32), ones, el,
                                   skip_empty=True)
    self.ragged = ragged_transport()

  def _send(self, a_mw):
    """Sorted local copies [m, w] -> received rows [n*B, w], source s at rows s*B.."""
    out = jnp.zeros((self.n * self.bound, a_mw.shape[-1]), a_mw.dtype)
    if self.ragged:
      me = jax.lax.axis_index(AXIS)
      where = jnp.full((self.n,), me * self.bound, jnp.int32)
      return jax.lax.ragged_all_to_all(a_mw, out, self.start_n, self.send_n, where, self.recv_n,
                                       axis_name=AXIS)
    buf = out.at[self.slot_m].set(a_mw, mode="drop").reshape(self.n, self.bound, -1)
    return jax.lax.all_to_all(buf, AXIS, 0, 0).reshape(self.n * self.bound, -1)

  def _return(self, y_rw):
    """Received rows [n*B, w] -> back to their senders, as sorted local copies [m, w]."""
    if self.ragged:
      back_at = jax.lax.all_to_all(self.start_n, AXIS, 0, 0)  # where source s keeps my rows
      out = jnp.zeros((self.m, y_rw.shape[-1]), y_rw.dtype)
      offs = jnp.arange(self.n, dtype=jnp.int32) * self.bound
      return jax.lax.ragged_all_to_all(y_rw, out, offs, self.recv_n, back_at, self.send_n,
                                       axis_name=AXIS)
    back = jax.lax.all_to_all(y_rw.reshape(self.n, self.bound, -1), AXIS, 0, 0)
    return back.reshape(self.n * self.bound, -1).at[self.slot_m].get(mode="fill", fill_value=0)

  def expand(self, a_td):
    return self.local.expand(self._send(self.outer.expand(a_td)))

  def gmm(self, a_g, w_edf):
    return self.local.gmm(a_g, w_edf)

  def combine(self, y_g):
    return self.outer.combine(self._return(self.local.combine(y_g)))


class CapacityExchange:
  """GShard: [E, c] slots per shard; all_to_all hands each device [el, n*c] of its experts."""

  def __init__(self, experts_tk, weights_tk, num_experts: int, n: int, capacity_factor: float):
    self.inner = moe.CapacityDispatch(experts_tk, weights_tk, num_experts, capacity_factor)
    self.dropped = self.inner.dropped

  def expand(self, a_td):
    return jax.lax.all_to_all(self.inner.expand(a_td), AXIS, 0, 1, tiled=True)

  def gmm(self, a_g, w_edf):
    return self.inner.gmm(a_g, w_edf)

  def combine(self, y_g):
    return self.inner.combine(jax.lax.all_to_all(y_g, AXIS, 1, 0, tiled=True))


def make_exchange(rt, experts_tk, weights_tk, num_experts: int, n: int):
  if n == 1:  # data / fsdp / tensor only: every device holds every expert
    return moe.make_dispatch(rt.moe_backend, experts_tk, weights_tk, num_experts,
                             rt.capacity_factor)
  if rt.moe_backend == "capacity":
    return CapacityExchange(experts_tk, weights_tk, num_experts, n, rt.capacity_factor)
  return RaggedExchange(experts_tk, weights_tk, num_experts, n, rt.moe_backend,
                        rt.ep_capacity_factor)


def _gather_fsdp(x, spec: P):
  """A weight split over fsdp, whole on this device (its backward is a reduce-scatter)."""
  for dim, axis in enumerate(spec):
    if axis == "fsdp":
      x = jax.lax.all_gather(x, "fsdp", axis=dim, tiled=True)
  return x


def _varying(w):
  """Mark a weight as varying over the batch axes, as the tokens it meets are: autodiff then
  psums its gradient over them at the pcast, which a custom VJP (gmm.py) needs to see."""
  missing = tuple(a for a in BATCH_AXES if a not in jax.typeof(w).manual_axis_type.varying)
  return jax.lax.pcast(w, missing, to="varying") if missing else w


def moe_block(mesh, block, x_btd):
  """MoeBlock.__call__ under shard_map: (y_btd, router_logits_bte f32, dropped copies)."""
  check(block.e, mesh, x_btd.shape[0], block.rt.ep_capacity_factor)
  if block.rt.moe_backend == "pallas" and pallas_gmm.interpret():
    # jax 0.10.2's Pallas interpreter cannot run under shard_map (its block slicing mixes
    # varying and unvarying operands); the Triton path lowers there (checked for CUDA).
    raise ConfigError("moe_backend='pallas' with a mesh (shard_map) needs a GPU: Pallas "
                      "interpret mode cannot run under shard_map; expected moe_backend=sorted "
                      "on CPU")
  graphdef, state = nnx.split(block.experts)
  flat = list(nnx.to_flat_state(state))
  w_specs = [spec_for(v.get_value().shape, v.get_metadata().get("logical_axes"), mesh)
             for _, v in flat]
  router = block.gate.kernel
  r_spec = spec_for(router.shape, router.get_metadata().get("logical_axes"), mesh)
  tensor_split = any("tensor" in s for s in w_specs)
  rt, k, e = block.rt, block.k, block.e
  batch = P(BATCH_AXES, None, None)

  def body(x_btd, router_de, values):
    b, s, d = x_btd.shape
    x_td = x_btd.reshape(b * s, d)
    logits_te, weights_tk, experts_tk = moe.route(x_td, _gather_fsdp(router_de, r_spec), k,
                                                  block.norm_topk)
    # Cast before the gather: bf16 compute moves half the bytes of the f32 params.
    local = [(p, v.replace(_varying(_gather_fsdp(a.astype(rt.dtype), sp))))
             for (p, v), a, sp in zip(flat, values, w_specs)]
    experts = nnx.merge(graphdef, nnx.from_flat_state(local))
    dispatch = make_exchange(rt, experts_tk, weights_tk, e, jax.lax.axis_size(AXIS))
    y_td = experts(dispatch, x_td)
    if tensor_split:  # each device holds a slice of the intermediate dim: partial sums
      y_td = jax.lax.psum(y_td, "tensor")
    dropped = jax.lax.psum(dispatch.dropped, BATCH_AXES)
    return y_td.reshape(b, s, d), logits_te.reshape(b, s, e), dropped

  fn = jax.shard_map(body, mesh=mesh, in_specs=(batch, r_spec, w_specs),
                     out_specs=(batch, batch, P()))
  return fn(x_btd, router[...], [v.get_value() for _, v in flat])
