"""Meshes and logical-axis rules; the only module that builds meshes or PartitionSpecs.

Mesh axes: data, fsdp, expert, tensor. Modules name logical axes on their params
(`logical_axes` metadata); RULES maps each to a mesh axis. Batches shard their leading dim
over data x fsdp x expert. A dim that an axis does not divide stays replicated on that axis,
except fsdp: a matrix whose named dims leave fsdp unused shards its largest free divisible dim
over it instead (wrapper factors such as `gate_b [e, r, f]` name no fsdp dim), so every large
param and its optimizer state is split under fsdp whatever its shape.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moedistill.errors import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
RULES = {
    "embed": "fsdp", "vocab": "tensor", "q_heads": "tensor", "kv_heads": "tensor",
    "mlp": "tensor", "expert_mlp": "tensor", "expert": "expert", "norm": None, None: None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: all devices left over by the other axes
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def shape(self, n_devices: int) -> tuple[int, ...]:
    sizes = [getattr(self, a) for a in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh={dict(zip(AXES, sizes))}: expected positive sizes, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if n_devices % known:
        raise ConfigError(f"mesh={dict(zip(AXES, sizes))}: {n_devices} devices are not "
                          f"divisible by {known}")
      sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
      raise ConfigError(f"mesh={dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"{n_devices} available")
    return tuple(sizes)


def make_mesh(mc: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mc.shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def spec_for(shape, logical_axes, mesh: Mesh) -> P:
  used, out = set(), []
  for dim, name in zip(shape, logical_axes or (None,) * len(shape)):
    axis = RULES.get(name)
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      out.append(None)
    else:
      used.add(axis)
      out.append(axis)
  n = mesh.shape["fsdp"]
  if n > 1 and "fsdp" not in used and len(shape) >= 2:  # vectors (norms) stay replicated
    free = [i for i, d in enumerate(shape) if out[i] is None and d % n == 0]
    if free:
      out[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*out)


def check_model_fits_mesh(cfg, mesh: Mesh):
  """A mesh axis that cannot split what it is meant to split is a config error, not a
  silent replication: tensor splits heads and vocab, expert splits experts."""
  need = (("tensor", "num_attention_heads", cfg.num_attention_heads),
          ("tensor", "num_key_value_heads", cfg.num_key_value_heads),
          ("tensor", "vocab_size", cfg.vocab_size),
          ("expert", "num_experts", cfg.num_experts or 1))
  for axis, field, n in need:
    if n % mesh.shape[axis]:
      raise ConfigError(f"config.mesh.{axis}={mesh.shape[axis]} does not divide the model's "
                        f"{field}={n}")


def param_sharding(mesh: Mesh, shape, logical_axes) -> NamedSharding:
  return NamedSharding(mesh, spec_for(shape, logical_axes, mesh))


def opt_state_shardings(tx, trainable, mesh: Mesh):
  """Shardings of tx.init(trainable) (arrays or ShapeDtypeStructs with .sharding): moments
  follow their params' shardings; scalars (step counts) are replicated."""
  rep = replicated(mesh)

  def leaf_sharding(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    hit = next((k for k in reversed(keys) if k in trainable), None)
    return trainable[hit].sharding if hit is not None else rep

  return jax.tree_util.tree_map_with_path(leaf_sharding, jax.eval_shape(tx.init, trainable))


def sharded_put(mesh: Mesh):
  """For hf.load_model: place each host array straight into its sharding (each process
  copies only the slices its devices hold)."""
  def put(var, arr: np.ndarray) -> jax.Array:
    axes = var.get_metadata().get("logical_axes")
    s = NamedSharding(mesh, spec_for(arr.shape, axes, mesh))
    return jax.make_array_from_callback(arr.shape, s, lambda idx: arr[idx])
  return put


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def on_mesh(mesh: Mesh, fn):
  """fn traced under `mesh` (wrap it before jax.jit): layers that read the abstract mesh (the
  MoE block's expert parallelism) see it, whoever calls or lowers the jitted function."""
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(mesh: Mesh, local_np: np.ndarray) -> jax.Array:
  """Assemble this process's rows into the global batch array (multi-process safe)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local_np.ndim), local_np)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host; a collective when other processes hold parts of it."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order, deduplicated over replicas."""
  shards = {}
  for s in x.addressable_shards:
    shards.setdefault(s.index[0].start or 0, s.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)
