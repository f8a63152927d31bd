"""Compile time of the layer stack: unrolled loop vs lax.scan over layers (Runtime.scan_layers),
at Qwen3-30B-A3B's structure (48 layers, 128 experts top-8, 32/4 heads) and a narrow width.

Programs (abstract inputs, nothing allocated): the student's loss + gradient (what `train`
compiles; rank-4 shared-core experts) and the teacher's forward (what `cache_logits` compiles).
Prints seconds for lower and compile per mode and the unrolled / scan ratio, plus XLA:CPU's
temporaries of each program.

  python scripts/bench_compile.py                    # 48 layers
  python scripts/bench_compile.py --layers 8 --seq 128
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moedistill.model.config import ModelConfig  # noqa: E402
from moedistill.model.layers import Runtime  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402
from moedistill.model.shared_core import Compression  # noqa: E402


def programs(cfg, rt, batch, seq):
  """{name: (jitted fn, abstract args)} for the student step and the teacher forward."""
  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  out = {}
  for name, comp in (("student loss+grad", Compression(4, 4, 4)), ("teacher forward", None)):
    model = nnx.eval_shape(lambda c=comp: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt,
                                                              compression=c))
    graphdef, state = nnx.split(model)

    def loss(state, tokens, segs, g=graphdef):
      h, aux = nnx.merge(g, state).hidden(tokens, segs)
      return jnp.mean(h ** 2) + sum(jnp.mean(r) for r in aux["router_logits"])

    fn = jax.value_and_grad(loss) if comp is not None else (
        lambda state, tokens, segs, g=graphdef: nnx.merge(g, state)(tokens, segs)[0])
    out[name] = (jax.jit(fn), (state, tok, tok))
  return out


def measure(fn, args):
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, compiled.memory_analysis().temp_size_in_bytes


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=48)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=2)
  a = p.parse_args()
  cfg = ModelConfig(vocab_size=2048, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                    moe_intermediate_size=a.hidden // 2, num_hidden_layers=a.layers,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=16, num_experts=128,
                    num_experts_per_tok=8, norm_topk_prob=True)
  print(f"{a.layers} layers, hidden {a.hidden}, 128 experts top-8, {a.batch} x {a.seq} tokens, "
        f"float32, {jax.devices()[0].platform}")
  results = {}
  for scan in (False, True):
    mode = "scan" if scan else "unrolled"
    for name, (fn, args) in programs(cfg, Runtime(scan_layers=scan), a.batch, a.seq).items():
      lower_s, compile_s, temp = measure(fn, args)
      results[name, mode] = lower_s + compile_s
      print(f"  {name:<18} {mode:<9} lower {lower_s:6.1f} s  compile {compile_s:6.1f} s  "
            f"XLA:CPU temp {temp / 2**20:8.1f} MiB", flush=True)
  for name in ("student loss+grad", "teacher forward"):
    print(f"  {name}: unrolled / scan = "
          f"{results[name, 'unrolled'] / results[name, 'scan']:.1f}x (lower + compile)")


if __name__ == "__main__":
  main()
