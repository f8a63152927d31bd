"""Compiled temp memory of the KD loss + gradient: dense reference vs fused vocab-chunked.

Usage: python scripts/bench_loss_memory.py [--tokens 8192 --vocab 151936 --hidden 2048 --k 64]
Nothing runs: both are lowered on abstract shapes and XLA's memory analysis is read, so it
works on a laptop for the 30B-A3B head shape. Prints JSON.
"""
import argparse
import json

import jax
import jax.numpy as jnp

from moedistill.training import loss
from moedistill.training.fused_stats import vocab_stats


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=8192)
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--dtype", default="float32",
                  help="float32 | bfloat16 (XLA:CPU upcasts a bf16 lm_head to f32 once, outside "
                       "the loop, so bf16 figures from a CPU compile overstate the fused temp)")
  a = ap.parse_args()
  dt = jnp.dtype(a.dtype)
  n, v, d, k = a.tokens, a.vocab, a.hidden, a.k
  S = jax.ShapeDtypeStruct
  args = (S((n, d), dt), S((d, v), dt), S((n, k), jnp.int32), S((n, k), jnp.bfloat16),
          S((n,), jnp.float32), S((n,), jnp.int32), S((n,), jnp.float32))
  kw = dict(alpha=0.5, temperature=1.0, mode="bucket")

  def reference(h, w, idx, tl, lse, lab, m):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return loss.kd_loss_reference(logits, idx, tl, lse, lab, m, **kw)[0]

  def fused(h, w, idx, tl, lse, lab, m):
    stats = vocab_stats(h, w, idx, lab, 1.0, a.chunk)
    return loss.finalize(*loss.loss_from_stats(stats, idx, tl, lse, m, **kw))[0]

  out = {"tokens": n, "vocab": v, "hidden": d, "k": k, "chunk": a.chunk, "dtype": a.dtype,
         "backend": jax.default_backend()}
  for name, fn in (("reference", reference), ("fused", fused)):
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
    out[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
  out["fused_over_reference"] = round(out["fused_temp_bytes"] / out["reference_temp_bytes"], 4)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
