"""Attention memory (and optionally speed): the plain XLA path (the [S, S] scores) against the
blocked, flash-style path, in one run. Loss + gradient of one attention call is lowered with
abstract inputs and measured with the planner's reading of XLA's memory analysis
(`hlo_cost.measure`: temporaries, i.e. everything but inputs and outputs) per row length, with
the blocked / plain ratio. Default shape: one row of Qwen3-30B-A3B's attention (32 query heads,
4 kv heads, head dim 128), float32 (the CPU compute dtype).

  python -m benchmarks.attention                                 # memory, S = 1k..8k
  python -m benchmarks.attention --time --seq=1024,2048,4096 --heads=8 --kv_heads=2 --head_dim=64
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import common

flags.DEFINE_list("seq", ["1024", "2048", "4096", "8192"], "row lengths")
flags.DEFINE_integer("batch", 1, "rows")
flags.DEFINE_integer("heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 4, "key/value heads")
flags.DEFINE_integer("head_dim", 128, "head dimension")
flags.DEFINE_integer("block", 512, "block of the blocked path")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q, k, v")
flags.DEFINE_bool("time", False, "also time fwd+bwd on real arrays (mean of --reps calls)")
flags.DEFINE_integer("reps", 3, "--time: calls timed after one warm-up")
flags.DEFINE_bool("smoke", False, "tiny shapes, timed too (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def loss_and_grad(impl):
  import jax
  import jax.numpy as jnp
  from moedistill.model import attention as A

  def loss(q, k, v, segs):
    return jnp.sum(A.attention(q, k, v, segs, impl=impl, block=F.block).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def shapes(s):
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(F.dtype)
  return ([jax.ShapeDtypeStruct((F.batch, s, x, F.head_dim), dt)
           for x in (F.heads, F.kv_heads, F.kv_heads)]
          + [jax.ShapeDtypeStruct((F.batch, s), jnp.int32)])


def temp_bytes(impl, s):
  from moedistill.hlo_cost import Program, measure
  fn = loss_and_grad(impl)
  return measure(Program(impl, lambda: fn.lower(*shapes(s)), params=0))["temp_bytes"]


def wall(impl, s):
  import jax
  import jax.numpy as jnp
  import numpy as np
  r = np.random.RandomState(0)
  args = [jnp.asarray(r.randn(*x.shape), x.dtype) for x in shapes(s)[:3]]
  args.append(jnp.asarray(np.sort(r.randint(1, 4, (F.batch, s)), axis=1), jnp.int32))
  f = loss_and_grad(impl)
  return common.timed(lambda: f(*args), F.reps, jax.block_until_ready)


def main(argv):
  del argv
  if F.smoke:
    F.seq, F.heads, F.kv_heads, F.head_dim, F.block = ["128"], 4, 2, 16, 32
    F.time, F.reps = True, 1
  import jax
  res = {"batch": F.batch, "heads": F.heads, "kv_heads": F.kv_heads, "head_dim": F.head_dim,
         "block": F.block, "dtype": F.dtype, "backend": jax.default_backend(), "rows": []}
  for s in map(int, F.seq):
    pb, bb = temp_bytes("plain", s), temp_bytes("blocked", s)
    row = {"seq": s, "plain_temp_mib": round(pb / 2**20, 1),
           "blocked_temp_mib": round(bb / 2**20, 1), "blocked_over_plain": round(bb / pb, 4)}
    if F.time:
      pt, bt = wall("plain", s), wall("blocked", s)
      row.update(plain_s=round(pt, 4), blocked_s=round(bt, 4), speed_blocked_over_plain=round(
          pt / bt, 2))
    print(row, flush=True)
    res["rows"].append(row)
  common.emit("attention", res, F.out)


if __name__ == "__main__":
  app.run(main)
