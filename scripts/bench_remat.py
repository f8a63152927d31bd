"""Activation memory per remat policy, with the ratio to `none` measured in the same run:
  saved: bytes autodiff keeps from the forward for the backward (params excluded), read from
    the jaxpr (what a policy changes, independent of any compiler's scheduling);
  XLA:CPU temp: compiled temporaries of loss + gradient (abstract inputs, nothing allocated).
    With unrolled layers XLA:CPU schedules the recomputation without lowering its peak (a
    plain 8-layer MLP chain shows the same temp with and without jax.checkpoint), so this
    column barely moves; with --scan_layers the loop forces one layer at a time and it does.

  python scripts/bench_remat.py                          # narrow model, 8 layers, 2 x 4096
  python scripts/bench_remat.py --scan_layers          # the same, layers under lax.scan
"""
import argparse
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moedistill.model.config import ModelConfig  # noqa: E402
from moedistill.model.layers import REMAT_POLICIES, Runtime  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402


def saved_bytes(loss, state, tok):
  # jax.ad_checkpoint.print_saved_residuals prints this list; the function itself is private.
  from jax._src.ad_checkpoint import saved_residuals
  res = saved_residuals(loss, state, tok, tok)
  return sum(math.prod(a.shape) * a.dtype.itemsize for a, src in res
             if not src.startswith("from the argument"))


def measure(cfg, rt, batch, seq):
  model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt))
  graphdef, state = nnx.split(model)

  def loss(state, tokens, segs):
    h, aux = nnx.merge(graphdef, state).hidden(tokens, segs)
    return jnp.mean(h.astype(jnp.float32) ** 2) + sum(jnp.mean(r) for r in aux["router_logits"])

  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  compiled = jax.jit(jax.value_and_grad(loss)).lower(state, tok, tok).compile()
  return saved_bytes(loss, state, tok), compiled.memory_analysis().temp_size_in_bytes


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--attention", default="blocked", choices=["plain", "blocked"])
  # capacity: XLA:CPU lowers ragged_dot to a dense masked matmul whose [tokens*k, experts, f]
  # temporaries would swamp what the policies change.
  p.add_argument("--moe_backend", default="capacity", choices=["capacity", "ragged"])
  p.add_argument("--scan_layers", action="store_true", help="lax.scan over the layers")
  a = p.parse_args()
  # Narrow: Qwen3-30B-A3B's head/expert counts and vocab shape ratios at a small width.
  cfg = ModelConfig(vocab_size=4096, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                    moe_intermediate_size=a.hidden // 2, num_hidden_layers=a.layers,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=64, num_experts=128,
                    num_experts_per_tok=8, norm_topk_prob=True)
  print(f"model loss+grad temporaries: {a.layers} layers, hidden {a.hidden}, 32/4 heads, 128 "
        f"experts top-8, {a.batch} x {a.seq} tokens, {a.attention} attention, "
        f"{a.moe_backend} MoE, float32{', scanned layers' if a.scan_layers else ''}")
  print(f"  {'remat':<6} {'saved MiB':>10} {'x none':>7} {'XLA:CPU temp MiB':>17} {'x none':>7}")
  base = None
  for remat in REMAT_POLICIES:
    rt = Runtime(remat=remat, attention=a.attention, moe_backend=a.moe_backend,
                 scan_layers=a.scan_layers)
    saved, temp = measure(cfg, rt, a.batch, a.seq)
    base = base or (saved, temp)
    print(f"  {remat:<6} {saved / 2**20:>10.1f} {saved / base[0]:>7.3f} {temp / 2**20:>17.1f} "
          f"{temp / base[1]:>7.3f}", flush=True)


if __name__ == "__main__":
  main()
