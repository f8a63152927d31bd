"""Greedy decoding tokens/s: moedistill.model.decode (jitted, KV-cached) against transformers'
generate(do_sample=False) on the same checkpoint in the same run, per batch size of 8-token
prompts, every row forced to run --new tokens (no EOS). Best of --repeats calls after one
warm-up call (the compile is timed apart; transformers: best of at most 2, its eager loop is
~100x slower here). Also checks that the two produce the same tokens.

  python -m benchmarks.generate --checkpoint=moedistill/assets/tiny_teacher --batch=1,8 --new=64
  python -m benchmarks.generate --notransformers          # decode alone
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from benchmarks import common

flags.DEFINE_string("checkpoint", str(common.REPO / "moedistill/assets/tiny_teacher"),
                    "HF checkpoint directory")
flags.DEFINE_list("batch", ["1", "8"], "batch sizes")
flags.DEFINE_integer("new", 64, "new tokens per row")
flags.DEFINE_integer("repeats", 5, "timed calls per batch size (the best one counts)")
flags.DEFINE_bool("transformers", True, "also time transformers' generate and compare tokens")
flags.DEFINE_bool("smoke", False, "batch 2, 4 new tokens, one timed call, decode alone (a "
                  "test of the script; tests/model/test_generate.py checks the tokens against "
                  "transformers)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def best_of(fn, repeats):
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def same_until_eos(ours, theirs, eos, prompt_len=8):
  """min_new_tokens keeps transformers from picking EOS, where decode (no eos_ids) may: each
  row is compared up to its first EOS."""
  eos = set(eos if isinstance(eos, list) else [eos])
  same = True
  for r_ours, r_theirs in zip(ours, theirs):
    stop = next((i for i in range(prompt_len, len(r_ours)) if r_ours[i] in eos), len(r_ours))
    same &= bool(np.array_equal(r_ours[:stop], r_theirs[:stop]))
  return same


def main(argv):
  del argv
  if F.smoke:
    F.batch, F.new, F.repeats, F.transformers = ["2"], 4, 1, False
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from moedistill.hub import hf
  from moedistill.model import decode
  model, cfg = hf.load_model(F.checkpoint)
  graphdef, state = nnx.split(model)
  prog = jax.jit(lambda st, t, n: decode.generate(nnx.merge(graphdef, st), t, n, F.new,
                                                  jax.random.key(0), greedy=True, eos_ids=()))
  torch_model = None
  if F.transformers:
    import torch
    from transformers import Qwen3MoeForCausalLM
    torch.set_num_threads(os.cpu_count())
    torch_model = Qwen3MoeForCausalLM.from_pretrained(F.checkpoint).eval()
  res = {"checkpoint": F.checkpoint, "new": F.new, "rows": []}
  for b in map(int, F.batch):
    prompts = np.random.RandomState(b).randint(2, cfg.vocab_size, (b, 8)).astype(np.int32)
    tokens, lens = jnp.asarray(prompts), jnp.full((b,), 8, jnp.int32)
    t0 = time.perf_counter()
    compiled = prog.lower(state, tokens, lens).compile()
    run = lambda: jax.block_until_ready(compiled(state, tokens, lens))  # noqa: E731
    ours = np.asarray(run()[0])
    row = {"batch": b, "compile_s": round(time.perf_counter() - t0, 1),
           "moedistill_tokens_per_s": round(b * F.new / best_of(run, F.repeats), 1)}
    if torch_model is not None:
      import torch
      x = torch.tensor(prompts, dtype=torch.long)

      def hf_run():
        with torch.no_grad():
          return torch_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=F.new, min_new_tokens=F.new,
                                      pad_token_id=0)
      row["transformers_tokens_per_s"] = round(b * F.new / best_of(hf_run, min(F.repeats, 2)),
                                               1)
      row["same_tokens_until_eos"] = same_until_eos(ours, hf_run().numpy(), cfg.eos_token_id)
    print(row, flush=True)
    res["rows"].append(row)
  common.emit("generate", res, F.out)


if __name__ == "__main__":
  app.run(main)
