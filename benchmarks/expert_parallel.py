"""FLOPs and collectives per device of one MoE layer (forward + backward) under shard_map
expert parallelism, AOT-compiled on 8 forced CPU devices at Qwen3-30B-A3B's expert widths, for
data=8, fsdp=8 and expert=8 against the same layer on one device (its FLOPs / 8 is the ideal
per device), in one run. Nothing runs: compile only, abstract inputs, measured by
`hlo_cost.measure` (the planner's measurement): FLOPs = XLA's cost analysis of the per-device
program; collectives = operand bytes of every collective in the compiled HLO and the bytes
each device receives per kind (groups of one device move nothing). On CPU,
jax.lax.ragged_dot lowers to a dense masked matmul (every row times every local expert), so
FLOPs count that lowering on one device and on each shard alike; the ratio is what says
whether the work is divided.

  python -m benchmarks.expert_parallel --rows=16 --seq=4096 --backend=capacity
  python -m benchmarks.expert_parallel --rows=16 --seq=4096 --backend=sorted \
      --ep_capacity_factor=1.25

--run: wall time instead, of the layer's forward+backward really executed (random weights and
inputs, even-ish routing) at narrower widths (--hidden, --moe_intermediate; 128 experts top-8),
median of --repeats after a warm-up: one device against expert=8 with `capacity`, dropless
`sorted` with worst-case buffers with and without the run-time skip of their empty tiles
(gmm.tiled_matmul_live; "without" = one chunk, always computed), and `sorted` bounded at
ep_capacity_factor 1.25. The 8 forced devices share this machine's cores, so the expert=8 wall
time is the work of all 8 devices together: divided work with nothing wasted reads ~1x the one
device's wall time, a buffer 8x the rows it holds reads ~8x.

  python -m benchmarks.expert_parallel --run --rows=8 --seq=256 --hidden=512 --moe_intermediate=256
"""
from __future__ import annotations

import os
import time

from absl import app, flags

from benchmarks import common

LAYOUTS = {"one device": (1, 1, 1, 1), "data=8": (8, 1, 1, 1), "fsdp=8": (1, 8, 1, 1),
           "expert=8": (1, 1, 8, 1)}
flags.DEFINE_integer("rows", 8, "rows of the batch (the batch shards must divide it)")
flags.DEFINE_integer("seq", 512, "tokens per row")
flags.DEFINE_enum("kind", "dense", ["dense", "core"], "dense experts or the shared-core student")
flags.DEFINE_enum("backend", "sorted", ["sorted", "ragged", "capacity"], "MoE backend")
flags.DEFINE_float("ep_capacity_factor", 0.0,
                   "dropless backends: bounded all-to-all buffers (0: worst case)")
flags.DEFINE_list("layouts", ["data=8", "fsdp=8", "expert=8"], f"some of {list(LAYOUTS)[1:]}")
flags.DEFINE_bool("run", False, "measure executed wall time (see the module's doc)")
flags.DEFINE_integer("hidden", 0, "hidden size (0: Qwen3-30B-A3B's 2048; 512 with --run)")
flags.DEFINE_integer("moe_intermediate", 0,
                     "expert width (0: Qwen3-30B-A3B's 768; 256 with --run)")
flags.DEFINE_integer("repeats", 3, "--run: timed calls per case (the median counts)")
flags.DEFINE_bool("smoke", False, "narrow widths, 8 x 16 tokens, expert=8 only (a test of the "
                  "script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def layer_config():
  hidden = F.hidden or (512 if F.run else 2048)
  moe_f = F.moe_intermediate or (256 if F.run else 768)
  return common.narrow_config(1, hidden=hidden, heads=32, kv_heads=4, head_dim=128,
                              moe_intermediate=moe_f, intermediate=3 * hidden)


def sharded_layer(cfg, rt, mesh_shape, kind, abstract):
  """(jitted grad of the layer's loss, state, x) on a mesh of `mesh_shape`: ShapeDtypeStructs
  when `abstract`, else random arrays placed in their shardings."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from moedistill import sharding
  from moedistill.model.qwen3_moe import DenseExperts, MoeBlock
  from moedistill.model.shared_core import Compression, SharedCoreExperts

  def build():
    rngs = nnx.Rngs(0)
    experts = (DenseExperts(cfg, rt, rngs) if kind == "dense"
               else SharedCoreExperts(cfg, Compression(128, 128, 128), rt, rngs))
    return MoeBlock(cfg, rt, rngs, experts)

  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  graphdef, state = nnx.split(nnx.eval_shape(build) if abstract else build())

  def place(v):
    s = sharding.param_sharding(mesh, v.shape, v.get_metadata().get("logical_axes"))
    return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) if abstract
                     else jax.device_put(v.get_value(), s))

  state = jax.tree.map(place, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  shape, xs = (F.rows, F.seq, cfg.hidden_size), sharding.batch_sharding(mesh, 3)
  x = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=xs) if abstract else jax.device_put(
      np.random.RandomState(0).randn(*shape).astype(np.float32), xs))

  def loss(state, x):
    y, logits, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * y) + jnp.sum(logits)

  return jax.jit(sharding.on_mesh(mesh, jax.grad(loss, argnums=(0, 1)))), state, x


def compiled_cost(cfg, mesh_shape, ep_capacity_factor):
  from moedistill.hlo_cost import Program, measure
  from moedistill.model.layers import Runtime
  rt = Runtime(moe_backend=F.backend, ep_capacity_factor=ep_capacity_factor)
  fn, state, x = sharded_layer(cfg, rt, mesh_shape, F.kind, abstract=True)
  m = measure(Program("moe layer", lambda: fn.lower(state, x), params=0))
  return {"flops_per_device": m["flops_per_device"],
          "collective_operand_mib": round(m["collective_bytes_per_device"] / 2**20, 1),
          "collective_received_mib": {k: round(v / 2**20, 1) for k, v in
                                      m["collective_traffic_per_device"].items() if v}}


def timed_layer(cfg, backend, mesh_shape, ep_capacity_factor, live_chunk_rows):
  """Median seconds of one MoE layer's forward+backward, executed."""
  import jax
  import numpy as np
  from moedistill.model import gmm
  from moedistill.model.layers import Runtime
  gmm.LIVE_CHUNK_ROWS = live_chunk_rows
  rt = Runtime(moe_backend=backend, ep_capacity_factor=ep_capacity_factor)
  fn, state, x = sharded_layer(cfg, rt, mesh_shape, "dense", abstract=False)
  jax.block_until_ready(fn(state, x))
  times = []
  for _ in range(F.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, x))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run_cases(cfg):
  big = 1 << 40  # one chunk: every tile computed, the buffer's full size
  cases = [("one device, sorted", "sorted", (1, 1, 1, 1), 0.0, big),
           ("one device, capacity", "capacity", (1, 1, 1, 1), 0.0, big),
           ("expert=8, capacity 1.25", "capacity", (1, 1, 8, 1), 0.0, big),
           ("expert=8, sorted worst-case, no skip", "sorted", (1, 1, 8, 1), 0.0, big),
           ("expert=8, sorted worst-case, skip", "sorted", (1, 1, 8, 1), 0.0, 512),
           ("expert=8, sorted ep_capacity 1.25, skip", "sorted", (1, 1, 8, 1), 1.25, 512)]
  out, base = {}, None
  for name, backend, shape, f, chunk in cases:
    t = timed_layer(cfg, backend, shape, f, chunk)
    base = base or t
    out[name] = {"ms": round(t * 1e3, 1), "over_one_device_sorted": round(t / base, 2)}
    print(f"{name:42} {t * 1e3:9.1f} ms  {t / base:5.2f}x one device (sorted)", flush=True)
  return out


def main(argv):
  del argv
  if F.smoke:
    F.hidden, F.moe_intermediate, F.seq, F.layouts = 64, 32, 16, ["expert=8"]
  common.force_cpu_devices(8)
  cfg = layer_config()
  res = {"hidden": cfg.hidden_size, "moe_intermediate": cfg.moe_intermediate_size,
         "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "tokens": [F.rows, F.seq],
         "dtype": "float32", "host_cpus": os.cpu_count()}
  if F.run:
    res["wall"] = run_cases(cfg)
    common.emit("expert_parallel", res, F.out)
    return
  res.update(kind=F.kind, backend=F.backend, ep_capacity_factor=F.ep_capacity_factor)
  base = compiled_cost(cfg, LAYOUTS["one device"], 0.0)
  res["one device"] = base
  print(f"one device: {base['flops_per_device'] / 1e12:.4f} TFLOP", flush=True)
  for name in F.layouts:
    c = res[name] = compiled_cost(cfg, LAYOUTS[name], F.ep_capacity_factor)
    c["x_ideal"] = round(c["flops_per_device"] / (base["flops_per_device"] / 8), 2)
    print(f"{name:10} {c['x_ideal']:6.2f}x ideal FLOPs, received MiB "
          f"{c['collective_received_mib']}", flush=True)
  common.emit("expert_parallel", res, F.out)


if __name__ == "__main__":
  app.run(main)
