"""Compile time of the layer stack: unrolled loop against lax.scan over layers
(Runtime.scan_layers), in one run, at Qwen3-30B-A3B's structure (48 layers, 128 experts top-8,
32/4 heads) at a narrow width.

Programs (abstract inputs, nothing allocated): the student's loss + gradient (what `train`
compiles; rank-4 shared-core experts) and the teacher's forward (what `cache_logits`
compiles). Each is lowered and compiled by `hlo_cost.measure` (the planner's measurement):
seconds of lower + compile per mode, the unrolled / scan ratio, and XLA:CPU's temporaries.

  python -m benchmarks.compile                                      # 48 layers
  python -m benchmarks.compile --layers=8 --seq=128
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("layers", 48, "decoder layers")
flags.DEFINE_integer("hidden", 64, "hidden size (expert width hidden / 2, dense 4 x hidden)")
flags.DEFINE_integer("vocab", 151936, "vocabulary (Qwen3's by default)")
flags.DEFINE_integer("seq", 256, "tokens per row")
flags.DEFINE_integer("batch", 2, "rows")
flags.DEFINE_bool("smoke", False, "a tiny MoE of one layer (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS
PROGRAMS = ("student loss+grad", "teacher forward")


def programs(cfg, rt):
  """{name: Program} for the student step and the teacher forward."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from moedistill.hlo_cost import Program
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  from moedistill.model.shared_core import Compression
  tok = jax.ShapeDtypeStruct((F.batch, F.seq), jnp.int32)
  out = {}
  for name, comp in zip(PROGRAMS, (Compression(4, 4, 4), None)):
    model = nnx.eval_shape(lambda c=comp: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt,
                                                              compression=c))
    graphdef, state = nnx.split(model)

    def loss(state, tokens, segs, g=graphdef):
      h, aux = nnx.merge(g, state).hidden(tokens, segs)
      return jnp.mean(h ** 2) + sum(jnp.mean(r) for r in aux["router_logits"])

    fn = jax.jit(jax.value_and_grad(loss) if comp is not None else (
        lambda state, tokens, segs, g=graphdef: nnx.merge(g, state)(tokens, segs)[0]))
    out[name] = Program(name, lambda fn=fn, state=state: fn.lower(state, tok, tok), params=0)
  return out


def main(argv):
  del argv
  if F.smoke:
    cfg, F.seq, F.batch = common.tiny_config(1), 16, 1
  else:
    cfg = dataclasses.replace(common.narrow_config(
        F.layers, hidden=F.hidden, heads=32, kv_heads=4, head_dim=16,
        moe_intermediate=F.hidden // 2, intermediate=4 * F.hidden), vocab_size=F.vocab)
  import jax
  from moedistill.hlo_cost import measure
  from moedistill.model.layers import Runtime
  res = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
         "experts": cfg.num_experts, "tokens": [F.batch, F.seq], "dtype": "float32",
         "backend": jax.default_backend(), "programs": {}}
  for mode in ("unrolled", "scan"):
    for name, prog in programs(cfg, Runtime(scan_layers=mode == "scan")).items():
      m = measure(prog)
      row = res["programs"].setdefault(name, {})
      row[f"{mode}_lower_compile_s"] = m["compile_s"]
      row[f"{mode}_temp_mib"] = round(m["temp_bytes"] / 2**20, 1)
      print(f"  {name:<18} {mode:<9} lower + compile {m['compile_s']:6.1f} s, XLA temp "
            f"{m['temp_bytes'] / 2**20:8.1f} MiB", flush=True)
  for row in res["programs"].values():
    row["unrolled_over_scan"] = round(row["unrolled_lower_compile_s"]
                                      / row["scan_lower_compile_s"], 2)
  common.emit("compile", res, F.out)


if __name__ == "__main__":
  app.run(main)
