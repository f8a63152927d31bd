"""Greedy decoding tokens/s: moedistill.model.decode (jitted, KV-cached) against transformers'
generate(do_sample=False) on the same checkpoint, batch sizes of 8-token prompts, every row
forced to run --new tokens (no EOS). Best of --repeats calls after one warm-up call (the
compile, timed apart; transformers: best of at most 2). Also checks the two produce the same tokens.

python scripts/bench_generate.py [--checkpoint=moedistill/assets/tiny_teacher] [--batch=1,8]
    [--new=64] [--repeats=5] [--no-transformers]
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moedistill.hub import hf  # noqa: E402
from moedistill.model import decode  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def best_of(fn, repeats):
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", default=str(REPO / "moedistill/assets/tiny_teacher"))
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--no-transformers", dest="transformers", action="store_false")
  a = ap.parse_args()
  model, cfg = hf.load_model(a.checkpoint)
  graphdef, state = nnx.split(model)
  prog = jax.jit(lambda st, t, n: decode.generate(nnx.merge(graphdef, st), t, n, a.new,
                                                  jax.random.key(0), greedy=True, eos_ids=()))
  torch_model = None
  if a.transformers:
    import torch
    from transformers import Qwen3MoeForCausalLM
    torch.set_num_threads(os.cpu_count())
    torch_model = Qwen3MoeForCausalLM.from_pretrained(a.checkpoint).eval()
  for b in map(int, a.batch.split(",")):
    prompts = np.random.RandomState(b).randint(2, cfg.vocab_size, (b, 8)).astype(np.int32)
    tokens, lens = jnp.asarray(prompts), jnp.full((b,), 8, jnp.int32)
    t0 = time.perf_counter()
    compiled = prog.lower(state, tokens, lens).compile()
    run = lambda: jax.block_until_ready(compiled(state, tokens, lens))  # noqa: E731
    ours = np.asarray(run()[0])
    compile_s = time.perf_counter() - t0
    row = {"batch": b, "new": a.new, "compile_s": round(compile_s, 1),
           "moedistill_tokens_per_s": round(b * a.new / best_of(run, a.repeats), 1)}
    if torch_model is not None:
      import torch
      x = torch.tensor(prompts, dtype=torch.long)
      def hf_run():
        with torch.no_grad():
          return torch_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=a.new, min_new_tokens=a.new,
                                      pad_token_id=0)
      # Best of at most 2: transformers' eager loop is ~100x slower here.
      row["transformers_tokens_per_s"] = round(b * a.new / best_of(hf_run, min(a.repeats, 2)),
                                               1)
      # min_new_tokens keeps transformers from picking EOS, where decode (no eos_ids) may:
      # compare each row up to its first EOS.
      theirs, eos = hf_run().numpy(), cfg.eos_token_id
      eos = set(eos if isinstance(eos, list) else [eos])
      same = True
      for r_ours, r_theirs in zip(ours, theirs):
        stop = next((i for i in range(8, len(r_ours)) if r_ours[i] in eos), len(r_ours))
        same &= bool(np.array_equal(r_ours[:stop], r_theirs[:stop]))
      row["same_tokens_until_eos"] = same
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
