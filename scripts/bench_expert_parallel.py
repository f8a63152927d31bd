"""FLOPs and collective bytes per device of the MoE layer (forward + backward), AOT-compiled on 8
forced CPU devices at Qwen3-30B-A3B's expert widths under shard_map expert parallelism, for data=8, fsdp=8 and
expert=8 against one device's FLOPs / 8. Nothing runs: compile only, abstract inputs.

  python scripts/bench_expert_parallel.py [--rows 8 --seq 512] [--kind dense|core]
      [--backend sorted|ragged|capacity] [--ep_capacity_factor F] [--layouts expert=8,...]

--run: wall time instead, of the layer's forward+backward really executed (random weights and
inputs, even-ish routing) at narrower widths (--hidden, --moe_intermediate; 128 experts top-8),
median of --repeats after a warm-up: one device against expert=8 with `capacity`, dropless
`sorted` with worst-case buffers with and without the run-time skip of their empty tiles
(gmm.tiled_matmul_live; "without" = one chunk, always computed), and `sorted` bounded at
ep_capacity_factor 1.25. The 8 forced devices share this machine's cores, so the expert=8 wall
time is the work of all 8 devices together: divided work with nothing wasted reads ~1x the one
device's wall time, a buffer 8x the rows it holds reads ~8x.

Collective bytes: the result shapes of every all-to-all / all-gather / reduce-scatter /
all-reduce / collective-permute in the compiled (per-device) HLO, summed per kind. FLOPs:
compiled.cost_analysis()["flops"] of the per-device program. On CPU, jax.lax.ragged_dot lowers
to a dense masked matmul (every row times every local expert), so FLOPs count that lowering on
one device and on each shard alike; the ratio is what says whether the work is divided.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moedistill import sharding  # noqa: E402
from moedistill.model.config import qwen3_30b_a3b  # noqa: E402
from moedistill.model.layers import Runtime  # noqa: E402
from moedistill.model.qwen3_moe import DenseExperts, MoeBlock  # noqa: E402
from moedistill.model.shared_core import Compression, SharedCoreExperts  # noqa: E402

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
         "s64": 8, "u64": 8, "f64": 8}
LAYOUTS = {"one device": (1, 1, 1, 1), "data=8": (8, 1, 1, 1), "fsdp=8": (1, 8, 1, 1),
           "expert=8": (1, 1, 8, 1)}


def _trivial_groups(line: str) -> bool:
  """Replica groups of one device each (a psum over a size-1 mesh axis): no traffic."""
  m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
  if m:
    return all("," not in g for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups, size]
  return bool(m) and int(m.group(2)) == 1


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes of the results of each collective kind in an HLO module text (async pairs counted
  once, at their -start; groups of one device skipped)."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?\S+ = (.+?) (all-to-all|all-gather|reduce-scatter|all-reduce|"
                 r"collective-permute)(-start)?\(", line)
    if not m or _trivial_groups(line):
      continue
    for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      out[m.group(2)] += n * BYTES.get(dt, 4)
  return out


def compile_layer(cfg, kind: str, backend: str, mesh_shape, rows: int, seq: int, ep: bool,
                  ep_capacity_factor: float = 0.0):
  rt = Runtime(moe_backend=backend, ep_capacity_factor=ep_capacity_factor)

  def build():
    rngs = nnx.Rngs(0)
    experts = (DenseExperts(cfg, rt, rngs) if kind == "dense"
               else SharedCoreExperts(cfg, Compression(128, 128, 128), rt, rngs))
    return MoeBlock(cfg, rt, rngs, experts)

  n = 1
  for s in mesh_shape:
    n *= s
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:n])
  abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(
      lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.param_sharding(
          mesh, v.shape, v.get_metadata().get("logical_axes")))),
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  x = jax.ShapeDtypeStruct((rows, seq, cfg.hidden_size), jnp.float32,
                           sharding=sharding.batch_sharding(mesh, 3))

  def loss(state, x):
    y, logits, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * y) + jnp.sum(logits)

  fn = jax.jit(sharding.on_mesh(mesh, jax.grad(loss, argnums=(0, 1))))
  return fn.lower(state, x).compile()


def timed_layer(cfg, backend: str, mesh_shape, rows: int, seq: int, ep_capacity_factor: float,
                live_chunk_rows: int, repeats: int) -> float:
  """Median seconds of one MoE layer's forward+backward, executed."""
  import time
  import numpy as np
  from moedistill.model import gmm
  gmm.LIVE_CHUNK_ROWS = live_chunk_rows
  rt = Runtime(moe_backend=backend, ep_capacity_factor=ep_capacity_factor)
  block = MoeBlock(cfg, rt, nnx.Rngs(0), DenseExperts(cfg, rt, nnx.Rngs(1)))
  graphdef, state = nnx.split(block)
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:n])
  state = jax.tree.map(lambda v: v.replace(jax.device_put(v.get_value(), sharding.param_sharding(
      mesh, v.shape, v.get_metadata().get("logical_axes")))), state,
      is_leaf=lambda v: isinstance(v, nnx.Variable))
  x = jax.device_put(np.random.RandomState(0).randn(rows, seq, cfg.hidden_size).astype(
      np.float32), sharding.batch_sharding(mesh, 3))

  def loss(state, x):
    y, logits, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * y) + jnp.sum(logits)

  fn = jax.jit(sharding.on_mesh(mesh, jax.grad(loss, argnums=(0, 1))))
  jax.block_until_ready(fn(state, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, x))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run_main(args):
  cfg = dataclasses.replace(qwen3_30b_a3b(), num_hidden_layers=1, hidden_size=args.hidden,
                            moe_intermediate_size=args.moe_intermediate)
  print(f"MoE layer fwd+bwd executed: hidden {args.hidden}, {cfg.num_experts} experts top-"
        f"{cfg.num_experts_per_tok}, moe_intermediate {args.moe_intermediate}, {args.rows}x"
        f"{args.seq} tokens, float32, 8 forced CPU devices on {os.cpu_count()} cores, median of "
        f"{args.repeats}", flush=True)
  big = 1 << 40  # one chunk: every tile computed, the buffer's full size
  cases = [("one device, sorted", "sorted", (1, 1, 1, 1), 0.0, big),
           ("one device, capacity", "capacity", (1, 1, 1, 1), 0.0, big),
           ("expert=8, capacity 1.25", "capacity", (1, 1, 8, 1), 0.0, big),
           ("expert=8, sorted worst-case, no skip", "sorted", (1, 1, 8, 1), 0.0, big),
           ("expert=8, sorted worst-case, skip", "sorted", (1, 1, 8, 1), 0.0, 512),
           ("expert=8, sorted ep_capacity 1.25, skip", "sorted", (1, 1, 8, 1), 1.25, 512)]
  base = None
  for name, backend, shape, f, chunk in cases:
    t = timed_layer(cfg, backend, shape, args.rows, args.seq, f, chunk, args.repeats)
    base = base or t
    print(f"{name:42} {t * 1e3:9.1f} ms  {t / base:5.2f}x one device (sorted)", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--kind", default="dense", choices=("dense", "core"))
  ap.add_argument("--backend", default="sorted", choices=("sorted", "ragged", "capacity"))
  ap.add_argument("--ep_capacity_factor", type=float, default=0.0,
                  help="dropless backends: bounded all-to-all buffers (0: worst case)")
  ap.add_argument("--layouts", default="data=8,fsdp=8,expert=8", help="subset of LAYOUTS")
  ap.add_argument("--run", action="store_true", help="measure executed wall time (see top)")
  ap.add_argument("--hidden", type=int, default=512, help="--run only")
  ap.add_argument("--moe_intermediate", type=int, default=256, help="--run only")
  ap.add_argument("--repeats", type=int, default=3, help="--run only")
  args = ap.parse_args()
  if args.run:
    return run_main(args)
  cfg = dataclasses.replace(qwen3_30b_a3b(), num_hidden_layers=1)
  print(f"MoE layer fwd+bwd, {args.kind} experts: hidden {cfg.hidden_size}, {cfg.num_experts} "
        f"experts top-{cfg.num_experts_per_tok}, moe_intermediate {cfg.moe_intermediate_size}, "
        f"{args.rows}x{args.seq} tokens, float32, {args.backend} backend, ep_capacity_factor "
        f"{args.ep_capacity_factor} (8 forced CPU devices)")
  base = compile_layer(cfg, args.kind, args.backend, (1, 1, 1, 1), args.rows, args.seq, True)
  base_flops = base.cost_analysis()["flops"]
  print(f"one device: {base_flops / 1e12:.3f} TFLOP; ideal per device /8: "
        f"{base_flops / 8e12:.4f} TFLOP", flush=True)
  head = f"{'layout':10} {'EP':4} {'TFLOP/dev':>10} {'x ideal':>8}  " + "  ".join(
      f"{c:>18}" for c in COLLECTIVES)
  print(head + "   (collective MiB per device)")
  for name in args.layouts.split(","):
    shape = LAYOUTS[name]
    for ep in (True,):
      c = compile_layer(cfg, args.kind, args.backend, shape, args.rows, args.seq, ep,
                        args.ep_capacity_factor)
      flops = c.cost_analysis()["flops"]
      cb = collective_bytes(c.as_text())
      print(f"{name:10} {'on' if ep else 'off':4} {flops / 1e12:10.3f} "
            f"{flops / (base_flops / 8):8.2f}  " + "  ".join(f"{cb[k] / 2**20:18.1f}"
                                                           for k in COLLECTIVES), flush=True)


if __name__ == "__main__":
  main()
