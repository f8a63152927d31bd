"""The CPU MoE path (`sorted`) against `ragged` (jax.lax.ragged_dot) at 128 experts top-8, in
the same run.

  python -m benchmarks.moe_cpu [--reps=5] [--shapes=1024x64x64,2048x128x64] [--tiles=8,16,32,64]

Each shape is tokens x hidden d x expert intermediate f (token copies m = 8 x tokens). Two
programs per backend, each forward and forward+backward (grad w.r.t. input and weights):
  gmm: expand the tokens to their copies and one grouped matmul [m, d] x [e, d, f]
  ffn: the whole SwiGLU expert FFN (moe.expert_ffn: gate+up, down, weighted combine)
Routing indices (argsort etc.) are computed inside each program, as in the model. Prints per
program the compiled FLOPs over the ideal (2*m*d*f per matmul, x3 with the backward) and the
compiled temporaries (both from hlo_cost.measure, what `plan` reports), the median wall time,
and ragged/sorted ratios; --tiles also times the sorted FFN per tile size.
"""
from __future__ import annotations

import time

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("reps", 5, "timed calls per program (median)")
flags.DEFINE_list("shapes", ["1024x64x64", "2048x128x64"], "tokens x d x f, ...")
flags.DEFINE_list("tiles", [], "also time the sorted FFN at these tile sizes")
flags.DEFINE_bool("smoke", False, "one small shape, one rep, one tile (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

E, K = 128, 8


def programs(backend, t, d, f):
  """name -> (fn(x, w, experts, weights) -> y, ideal forward FLOPs, weight shapes)."""
  from moedistill.model import moe
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
  import jax
  import jax.numpy as jnp

  def grads(x, w, experts, weights):
    loss = lambda x, w: jnp.sum(fn(x, w, experts, weights)[: ct.shape[0]] * ct)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(x, w)
  return grads


def compiled_stats(fn, args):
  """(FLOPs, temporary bytes) of the compiled program, as `plan` measures them."""
  import jax
  from moedistill.hlo_cost import Program, measure
  m = measure(Program("bench", lambda: jax.jit(fn).lower(*args), params=0))
  return m["flops_per_device"], m["temp_bytes"]


def median_ms(fn, args, reps):
  import jax
  import numpy as np
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def routed(t, d, seed=0):
  """(tokens [t, d], top-k weights, experts): distinct experts per token, as routing gives."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(r.normal(size=(t, E)))), K)
  return x, weights, experts


def measure(t, d, f, reps):
  import jax.numpy as jnp
  import numpy as np
  x, weights, experts = routed(t, d)
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
  for key in ("gmm.fwd", "gmm.fwd_bwd", "ffn.fwd", "ffn.fwd_bwd"):
    out[f"{key}.time_ragged_over_sorted"] = round(
        out[f"{key}.ragged"]["ms"] / max(out[f"{key}.sorted"]["ms"], 1e-3), 1)
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
                   f"{r['ms']:8.2f} | {out[f'{key}.time_ragged_over_sorted']:17.1f}x")
  return "\n".join(lines)


def tile_sweep(t, d, f, tiles, reps):
  """{tile: {fwd_ms, fwd_bwd_ms}} of the sorted expert FFN."""
  import jax.numpy as jnp
  import numpy as np
  from moedistill.model import moe
  x, weights, experts = routed(t, d)
  r = np.random.default_rng(1)
  w = [jnp.asarray(r.normal(size=s) * 0.1, jnp.float32) for s in ((E, d, f),) * 2 + ((E, f, d),)]
  ct = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  out = {}
  for tile in tiles:
    def fn(x, w, experts, weights, tile=tile):
      return moe.expert_ffn(moe.SortedDispatch(experts, weights, E, tile), x, *w)
    args = (x, w, experts, weights)
    out[tile] = {"fwd_ms": round(median_ms(fn, args, reps), 2),
                 "fwd_bwd_ms": round(median_ms(fwd_bwd(fn, ct), args, reps), 2)}
    print(f"m={t * K} d={d} f={f} tile={tile:3d}: ffn fwd {out[tile]['fwd_ms']:7.2f} ms, "
          f"fwd+bwd {out[tile]['fwd_bwd_ms']:7.2f} ms", flush=True)
  return out


def main(argv):
  del argv
  if F.smoke:
    F.shapes, F.reps, F.tiles = ["64x16x16"], 1, ["8"]
  import jax
  shapes = [tuple(int(v) for v in s.split("x")) for s in F.shapes]
  res = {f"m={t * K} d={d} f={f}": measure(t, d, f, F.reps) for t, d, f in shapes}
  print(f"{E} experts top-{K}, float32, {jax.devices()[0].device_kind}")
  print(table(res), flush=True)
  tiles = {f"m={t * K} d={d} f={f}": tile_sweep(t, d, f, [int(v) for v in F.tiles], F.reps)
           for t, d, f in shapes} if F.tiles else {}
  common.emit("moe_cpu", {"experts": E, "top_k": K, "dtype": "float32",
                          "device": jax.devices()[0].device_kind, "shapes": res,
                          "sorted_tiles": tiles, "peak_rss_gib": common.peak_rss_gib()}, F.out)


if __name__ == "__main__":
  app.run(main)
