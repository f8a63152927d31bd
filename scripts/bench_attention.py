"""Attention memory (and optionally speed): plain XLA path vs blocked (flash-style) path.

Compiles loss + gradient of one attention call with abstract inputs and prints XLA's
memory analysis (temporaries, i.e. everything but inputs and outputs) per row length, and the
blocked / plain ratio. Default shape: one row of Qwen3-30B-A3B's attention (32 query heads,
4 kv heads, head dim 128), float32 (the CPU compute dtype).

  python scripts/bench_attention.py                      # memory, S = 1k..8k
  python scripts/bench_attention.py --time --seq 2048    # plus wall time of fwd+bwd on CPU
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moedistill.model import attention as A  # noqa: E402


def loss_and_grad(impl, block):
  def loss(q, k, v, segs):
    return jnp.sum(A.attention(q, k, v, segs, impl=impl, block=block).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def shapes(a, s):
  dt = jnp.dtype(a.dtype)
  return ([jax.ShapeDtypeStruct((a.batch, s, x, a.head_dim), dt)
           for x in (a.heads, a.kv_heads, a.kv_heads)] + [jax.ShapeDtypeStruct((a.batch, s),
                                                                               jnp.int32)])


def temp_bytes(impl, a, s):
  compiled = loss_and_grad(impl, a.block).lower(*shapes(a, s)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def wall(impl, a, s, reps=3):
  r = np.random.RandomState(0)
  args = [jnp.asarray(r.randn(*x.shape), x.dtype) for x in shapes(a, s)[:3]]
  args.append(jnp.asarray(np.sort(r.randint(1, 4, (a.batch, s)), axis=1), jnp.int32))
  f = loss_and_grad(impl, a.block)
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(f(*args))
  return (time.perf_counter() - t0) / reps


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--time", action="store_true", help="also time fwd+bwd (runs real arrays)")
  a = p.parse_args()
  print(f"loss+grad temporaries, b={a.batch} heads={a.heads}/{a.kv_heads} h={a.head_dim} "
        f"block={a.block} {a.dtype} ({jax.devices()[0].platform})")
  print(f"{'S':>6} {'plain MiB':>11} {'blocked MiB':>12} {'blocked/plain':>14}"
        + (f" {'plain s':>8} {'blocked s':>10} {'speed ratio':>12}" if a.time else ""))
  for s in a.seq:
    pb, bb = temp_bytes("plain", a, s), temp_bytes("blocked", a, s)
    line = f"{s:>6} {pb / 2**20:>11.1f} {bb / 2**20:>12.1f} {bb / pb:>14.4f}"
    if a.time:
      pt, bt = wall("plain", a, s), wall("blocked", a, s)
      line += f" {pt:>8.3f} {bt:>10.3f} {pt / bt:>12.2f}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
