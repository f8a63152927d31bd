"""Activation memory per remat policy, with the ratio to `none` measured in the same run:
  saved: bytes autodiff keeps from the forward for the backward (params excluded), read from
    the jaxpr (what a policy changes, independent of any compiler's scheduling);
  XLA:CPU temp: compiled temporaries of loss + gradient (abstract inputs, nothing allocated;
    hlo_cost.measure, what `plan` reports). With unrolled layers XLA:CPU schedules the
    recomputation without lowering its peak (a plain 8-layer MLP chain shows the same temp
    with and without jax.checkpoint), so this column barely moves; with --scan_layers the
    loop forces one layer at a time and it does.

  python -m benchmarks.remat                   # Qwen3-30B-A3B narrowed to hidden 256, 8 layers
  python -m benchmarks.remat --scan_layers     # the same, layers under lax.scan
"""
from __future__ import annotations

import math

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("layers", 8, "decoder layers")
flags.DEFINE_integer("hidden", 256, "hidden width (experts: hidden / 2, dense MLP: 4 x hidden)")
flags.DEFINE_integer("seq", 4096, "tokens per row")
flags.DEFINE_integer("batch", 2, "rows")
flags.DEFINE_enum("attention", "blocked", ["plain", "blocked"], "attention implementation")
# capacity: XLA:CPU lowers ragged_dot to a dense masked matmul whose [tokens*k, experts, f]
# temporaries would swamp what the policies change.
flags.DEFINE_enum("moe_backend", "capacity", ["capacity", "ragged"], "MoE backend")
flags.DEFINE_bool("scan_layers", False, "lax.scan over the layers")
flags.DEFINE_bool("smoke", False, "a small MoE, 2 layers, 1 x 128 tokens (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def saved_bytes(loss, state, tok):
  # jax.ad_checkpoint.print_saved_residuals prints this list; the function itself is private.
  from jax._src.ad_checkpoint import saved_residuals
  res = saved_residuals(loss, state, tok, tok)
  return sum(math.prod(a.shape) * a.dtype.itemsize for a, src in res
             if not src.startswith("from the argument"))


def measure(cfg, rt, batch, seq):
  """(saved bytes, compiled temporary bytes) of loss + gradient."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from moedistill.hlo_cost import Program, measure as compiled
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt))
  graphdef, state = nnx.split(model)

  def loss(state, tokens, segs):
    h, aux = nnx.merge(graphdef, state).hidden(tokens, segs)
    return jnp.mean(h.astype(jnp.float32) ** 2) + sum(jnp.mean(r) for r in aux["router_logits"])

  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  m = compiled(Program("remat", lambda: jax.jit(jax.value_and_grad(loss)).lower(state, tok, tok),
                       params=0))
  return saved_bytes(loss, state, tok), m["temp_bytes"]


def main(argv):
  del argv
  if F.smoke:
    F.layers, F.batch, F.seq = 2, 1, 128
  common.force_cpu_devices(1)
  from moedistill.model.layers import REMAT_POLICIES, Runtime
  cfg = (common.tiny_config(F.layers) if F.smoke else
         common.narrow_config(F.layers, hidden=F.hidden, heads=32, kv_heads=4, head_dim=64,
                              moe_intermediate=F.hidden // 2, intermediate=4 * F.hidden))
  print(f"model loss+grad temporaries: {F.layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, {cfg.num_experts} experts "
        f"top-{cfg.num_experts_per_tok}, {F.batch} x {F.seq} tokens, {F.attention} attention, "
        f"{F.moe_backend} MoE, float32{', scanned layers' if F.scan_layers else ''}")
  print(f"  {'remat':<6} {'saved MiB':>10} {'x none':>7} {'XLA:CPU temp MiB':>17} {'x none':>7}")
  base, res = None, {}
  for remat in REMAT_POLICIES:
    rt = Runtime(remat=remat, attention=F.attention, moe_backend=F.moe_backend,
                 scan_layers=F.scan_layers)
    saved, temp = measure(cfg, rt, F.batch, F.seq)
    base = base or (saved, temp)
    res[remat] = {"saved_mib": round(saved / 2**20, 1), "saved_x_none": round(saved / base[0], 3),
                  "temp_mib": round(temp / 2**20, 1), "temp_x_none": round(temp / base[1], 3)}
    print(f"  {remat:<6} {saved / 2**20:>10.1f} {saved / base[0]:>7.3f} {temp / 2**20:>17.1f} "
          f"{temp / base[1]:>7.3f}", flush=True)
  common.emit("remat", {"layers": F.layers, "hidden": cfg.hidden_size, "batch": F.batch,
                        "seq": F.seq, "attention": F.attention, "moe_backend": F.moe_backend,
                        "scan_layers": F.scan_layers, "policies": res}, F.out)


if __name__ == "__main__":
  app.run(main)
