"""Compiled temporaries of the KD loss + gradient: the dense reference (full [tokens, vocab]
logits) against the fused vocab-chunked path, in one run. Nothing runs: both are lowered on
abstract shapes and measured with the planner's own reading of XLA's memory analysis
(`hlo_cost.measure`), so it works on a laptop for the 30B-A3B head shape.

  python -m benchmarks.loss_memory --tokens=8192 --vocab=151936 --hidden=2048 --k=64
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("tokens", 8192, "tokens of the batch")
flags.DEFINE_integer("vocab", 151936, "vocabulary (Qwen3's by default)")
flags.DEFINE_integer("hidden", 2048, "hidden size (Qwen3-30B-A3B's by default)")
flags.DEFINE_integer("k", 64, "cached top-k entries per token")
flags.DEFINE_integer("chunk", 4096, "vocab chunk of the fused path")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "hidden states and lm_head (XLA:CPU upcasts a bf16 lm_head to f32 once, outside "
                  "the loop, so bf16 figures from a CPU compile overstate the fused temp)")
flags.DEFINE_bool("smoke", False, "tiny shapes (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def main(argv):
  del argv
  if F.smoke:
    F.tokens, F.vocab, F.hidden, F.k, F.chunk = 64, 1024, 32, 8, 256
  import jax
  import jax.numpy as jnp
  from moedistill.hlo_cost import Program, measure
  from moedistill.training import loss
  from moedistill.training.fused_stats import vocab_stats
  dt = jnp.dtype(F.dtype)
  n, v, d, k = F.tokens, F.vocab, F.hidden, F.k
  S = jax.ShapeDtypeStruct
  args = (S((n, d), dt), S((d, v), dt), S((n, k), jnp.int32), S((n, k), jnp.bfloat16),
          S((n,), jnp.float32), S((n,), jnp.int32), S((n,), jnp.float32))
  kw = dict(alpha=0.5, temperature=1.0, mode="bucket")

  def reference(h, w, idx, tl, lse, lab, m):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return loss.kd_loss_reference(logits, idx, tl, lse, lab, m, **kw)[0]

  def fused(h, w, idx, tl, lse, lab, m):
    stats = vocab_stats(h, w, idx, lab, 1.0, F.chunk)
    return loss.finalize(*loss.loss_from_stats(stats, idx, tl, lse, m, **kw))[0]

  res = {"tokens": n, "vocab": v, "hidden": d, "k": k, "chunk": F.chunk, "dtype": F.dtype,
         "backend": jax.default_backend()}
  for name, fn in (("reference", reference), ("fused", fused)):
    prog = jax.jit(jax.grad(fn, argnums=(0, 1)))
    m = measure(Program(name, lambda p=prog: p.lower(*args), params=0))
    res[f"{name}_temp_bytes"] = m["temp_bytes"]
  res["fused_over_reference"] = round(res["fused_temp_bytes"] / res["reference_temp_bytes"], 4)
  common.emit("loss_memory", res, F.out)


if __name__ == "__main__":
  app.run(main)
