"""The CPU MoE path (`sorted`) against `ragged` (jax.lax.ragged_dot) at 128 experts top-8.

Usage:  python scripts/bench_moe_cpu.py [--reps 5] [--shapes 1024x64x64,2048x128x64]
                                       [--tiles 8,16,32,64]
Each shape is tokens x hidden d x expert intermediate f (token copies m = 8 x tokens). Two
programs per backend, each forward and forward+backward (grad w.r.t. input and weights):
  gmm: expand the tokens to their copies and one grouped matmul [m, d] x [e, d, f]
  ffn: the whole SwiGLU expert FFN (moe.expert_ffn: gate+up, down, weighted combine)
Routing indices (argsort etc.) are computed inside each program, as in the model. Prints per
program the compiled FLOPs (cost_analysis) over the ideal (2*m*d*f per matmul, x3 with the
backward), temporary bytes (memory_analysis), median wall time, and ragged/sorted ratios.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moedistill.model import moe  # noqa: E402

E, K = 128, 8


def programs(backend, t, d, f):
  """name -> (fn(x, w, experts, weights) -> y, ideal forward FLOPs, weight shapes)."""
  m = t * K

  def gmm(x, w, experts, weights):
    disp = moe.make_dispatch(backend, experts, weights, E)
    return disp.gmm(disp.expand(x), w[0])

  def ffn(x, w, experts, weights):
    return moe.expert_ffn(moe.make_dispatch(backend, experts, weights, E), x, *w)

  return {"gmm": (gmm, 2 * m * d * f, [(E, d, f)]),
          "ffn": (ffn, 3 * 2 * m * d * f, [(E, d, f), (E, d, f), (E, f, d)])}


def fwd_bwd(fn, ct):
  """grad of sum(fn(...) * ct) w.r.t. input and weights; gmm outputs keep the copies only
  (the sorted layout appends zero padding rows)."""
  def grads(x, w, experts, weights):
    loss = lambda x, w: jnp.sum(fn(x, w, experts, weights)[: ct.shape[0]] * ct)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(x, w)
  return grads


def compiled_stats(fn, args):
  c = jax.jit(fn).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"], c.memory_analysis().temp_size_in_bytes


def median_ms(fn, args, reps):
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def measure(t, d, f, reps):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  # Distinct experts per token, as top-k routing gives.
  weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(r.normal(size=(t, E)))), K)
  out = {}
  for name in ("gmm", "ffn"):
    for backend in ("sorted", "ragged"):
      fn, ideal, shapes = programs(backend, t, d, f)[name]
      rw = np.random.default_rng(1)  # the same weights and cotangent for both backends
      w = [jnp.asarray(rw.normal(size=s) * 0.1, jnp.float32) for s in shapes]
      ct = jnp.asarray(rw.normal(size=(t * K, f) if name == "gmm" else (t, d)), jnp.float32)
      args = (x, w, experts, weights)
      for mode, prog, mult in (("fwd", fn, 1), ("fwd_bwd", fwd_bwd(fn, ct), 3)):
        flops, temp = compiled_stats(prog, args)
        out[f"{name}.{mode}.{backend}"] = {
            "flops_over_ideal": round(flops / (mult * ideal), 2),
            "temp_mib": round(temp / 2**20, 1), "ms": round(median_ms(prog, args, reps), 2)}
  return out


def table(res):
  """One line per shape, program and mode: FLOPs/ideal, temp MiB, ms for each backend."""
  lines = [f"{'shape':24s} {'program':12s} {'sorted: flops/ideal':>19s} {'temp MiB':>9s} "
           f"{'ms':>8s} | {'ragged: flops/ideal':>19s} {'temp MiB':>9s} {'ms':>8s} | "
           f"{'time ragged/sorted':>18s}"]
  for shape, out in res.items():
    for key in ("gmm.fwd", "gmm.fwd_bwd", "ffn.fwd", "ffn.fwd_bwd"):
      s, r = out[f"{key}.sorted"], out[f"{key}.ragged"]
      lines.append(f"{shape:24s} {key:12s} {s['flops_over_ideal']:19.2f} {s['temp_mib']:9.1f} "
                   f"{s['ms']:8.2f} | {r['flops_over_ideal']:19.2f} {r['temp_mib']:9.1f} "
                   f"{r['ms']:8.2f} | {r['ms'] / s['ms']:17.1f}x")
  return "\n".join(lines)


def tile_sweep(t, d, f, tiles, reps):
  """Wall ms of the sorted expert FFN, forward and forward+backward, per tile size."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(r.normal(size=(t, E)))), K)
  w = [jnp.asarray(r.normal(size=s) * 0.1, jnp.float32) for s in ((E, d, f),) * 2 + ((E, f, d),)]
  ct = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  lines = []
  for tile in tiles:
    def fn(x, w, experts, weights, tile=tile):
      return moe.expert_ffn(moe.SortedDispatch(experts, weights, E, tile), x, *w)
    args = (x, w, experts, weights)
    lines.append(f"m={t * K} d={d} f={f} tile={tile:3d}: ffn fwd "
                 f"{median_ms(fn, args, reps):7.2f} ms, fwd+bwd "
                 f"{median_ms(fwd_bwd(fn, ct), args, reps):7.2f} ms")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--shapes", default="1024x64x64,2048x128x64", help="tokens x d x f, ...")
  ap.add_argument("--tiles", default="", help="also time the sorted FFN at these tile sizes")
  a = ap.parse_args()
  res = {}
  for s in a.shapes.split(","):
    t, d, f = (int(v) for v in s.split("x"))
    res[f"m={t * K} d={d} f={f}"] = measure(t, d, f, a.reps)
  print(f"{E} experts top-{K}, float32, {jax.devices()[0].device_kind}")
  print(table(res))
  for s in a.shapes.split(",") if a.tiles else ():
    t, d, f = (int(v) for v in s.split("x"))
    print(tile_sweep(t, d, f, [int(v) for v in a.tiles.split(",")], a.reps))
  print(json.dumps(res))


if __name__ == "__main__":
  main()
