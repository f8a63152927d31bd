"""Generate text with a teacher, a native student or an HF export: KV-cached, batched decoding
(moedistill.model.decode), sharded on the config's mesh, each row stopping at EOS.

CLI: python -m moedistill.generate --checkpoint=DIR (--prompt=TEXT | --prompts=FILE.jsonl)
         [--max_new_tokens=64] [--temperature=0] [--top_p=1] [--seed=0] [--batch_size=0]
         [--ignore_eos]
     python -m moedistill.generate --config=configs/two_stage.py --prompt=TEXT
         (<workdir>/export with the config's mesh and compute settings)
  --prompts: one {"prompt": "..."} object per line. --temperature=0 is greedy (the tokens
  transformers' generate(do_sample=False) gives); > 0 samples from the top_p nucleus, with
  keys from --seed. --batch_size: prompts per generate call (0 = all at once).
  --ignore_eos: every row runs --max_new_tokens (for measuring tokens/s).
Prints one JSON line per prompt ({"prompt", "completion", "new_tokens", "stopped"}), then a
`# ...` line with the tokens/s of the timed calls (compilation excluded and reported apart).
The tokenizer is the checkpoint's, else the config's data.tokenizer (exports and compressed
students copy the teacher's); EOS ids are config.json's eos_token_id, else the tokenizer's.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moedistill import sharding
from moedistill.cli import load_job, pick, run
from moedistill.errors import UserError
from moedistill.hub import hf
from moedistill.model import decode, moe
from moedistill.model.layers import Runtime


def define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "teacher, native student or HF export directory "
                      "(default: <config.workdir>/export, the distilled student)")
  flags.DEFINE_string("prompt", None, "one prompt")
  flags.DEFINE_string("prompts", None, "a .jsonl file, one {\"prompt\": ...} per line")
  flags.DEFINE_integer("max_new_tokens", 64, "new tokens per prompt, at most")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples")
  flags.DEFINE_float("top_p", 1.0, "sampling: keep the most probable tokens up to this mass")
  flags.DEFINE_integer("seed", 0, "sampling key")
  flags.DEFINE_integer("batch_size", 0, "prompts per call (0 = all)")
  flags.DEFINE_bool("ignore_eos", False, "always generate --max_new_tokens (benchmarks)")


def check_flags(F):
  """Bad values, one line each, before anything loads."""
  if (F.prompt is None) == (F.prompts is None):
    raise UserError("expected exactly one of --prompt=TEXT or --prompts=FILE.jsonl")
  if F.max_new_tokens < 1:
    raise UserError(f"--max_new_tokens={F.max_new_tokens}: expected >= 1")
  if not F.temperature >= 0:  # also refuses nan
    raise UserError(f"--temperature={F.temperature}: expected >= 0 (0 = greedy)")
  if not 0 < F.top_p <= 1:
    raise UserError(f"--top_p={F.top_p}: expected 0 < top_p <= 1")
  if F.batch_size < 0:
    raise UserError(f"--batch_size={F.batch_size}: expected >= 0 (0 = all prompts at once)")


def read_prompts(F) -> list[str]:
  if F.prompt is not None:
    if not F.prompt:
      raise UserError("--prompt='': expected a non-empty prompt")
    return [F.prompt]
  path = Path(F.prompts)
  if not path.is_file():
    raise UserError(f"--prompts={path}: no such file")
  out = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"--prompts={path}: line {i} is not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
      raise UserError(f"--prompts={path}: line {i}: expected {{\"prompt\": \"non-empty text\"}}")
    out.append(obj["prompt"])
  if not out:
    raise UserError(f"--prompts={path}: no prompts")
  return out


def load_tokenizer(checkpoint, fallback):
  from transformers import AutoTokenizer
  for where in (checkpoint, fallback):
    if where and (Path(where) / "tokenizer_config.json").exists():
      return AutoTokenizer.from_pretrained(str(where))
  raise UserError(f"--checkpoint={checkpoint}: no tokenizer (tokenizer_config.json) there or "
                  f"in the config's data.tokenizer ({fallback or 'none'})")


def eos_ids(cfg, tokenizer) -> tuple[int, ...]:
  ids = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
  if ids is None:
    return ()
  return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def dropless(rt: Runtime) -> Runtime:
  """Decoding routes a handful of tokens per step: a capacity backend would drop copies that
  transformers keeps, so it becomes ragged (dropless) here; others are kept."""
  if moe.resolve_backend(rt.moe_backend) == "capacity":
    return dataclasses.replace(rt, moe_backend="ragged")
  return rt


def make_program(graphdef, max_new_tokens: int, greedy: bool, mesh, pad_id: int):
  """jitted (state, tokens_bp, lens_b, key, temperature, top_p, eos) -> (tokens, lengths),
  traced under `mesh` (the MoE layers' expert parallelism reads it); shapes fix the program."""
  def fn(state, tokens_bp, lens_b, key, temperature, top_p, eos):
    return decode.generate(nnx.merge(graphdef, state), tokens_bp, lens_b, max_new_tokens, key,
                           greedy=greedy, temperature=temperature, top_p=top_p, eos_ids=eos,
                           pad_id=pad_id)
  return jax.jit(sharding.on_mesh(mesh, fn), out_shardings=sharding.replicated(mesh))


def put_rows(mesh, arr: np.ndarray):
  """A host array every process holds whole, sharded over the mesh's batch axes."""
  s = sharding.batch_sharding(mesh, arr.ndim)
  return jax.make_array_from_callback(arr.shape, s, lambda idx: arr[idx])


def summary(calls, prompts: int, greedy: bool, rows: int, compile_s: float) -> str:
  """The tokens/s line. A compiled program's first call also pays one-time runtime setup
  (tiny teacher, batch 8, 64 tokens, 4 calls: about 0.40 s for the first, 0.09 s for each
  later one; docs/generate.md), so with several calls the rate after the first is given too."""
  secs, new = (sum(c) for c in zip(*calls))
  line = (f"# {prompts} prompts, {new} new tokens in {secs:.3f} s: {new / secs:.1f} tokens/s "
          f"({'greedy' if greedy else 'sampled'}, batch {rows}, {len(calls)} "
          f"call{'s' * (len(calls) != 1)}, "
          f"compile {compile_s:.1f} s")
  if len(calls) > 1:
    rest_s, rest_new = (sum(c) for c in zip(*calls[1:]))
    line += f"; after the first call: {rest_new / rest_s:.1f} tokens/s"
  return line + ")"


def main(argv):
  job, F = load_job(argv, required=False)
  check_flags(F)
  prompts = read_prompts(F)
  checkpoint = pick(F.checkpoint, "checkpoint", job and str(Path(job.workdir, "export")))
  if not (Path(checkpoint) / "config.json").exists():
    raise UserError(f"--checkpoint={checkpoint}: no config.json (not a checkpoint directory)")
  tokenizer = load_tokenizer(checkpoint, job and job.train_data.tokenizer)
  mesh = sharding.make_mesh(job.mesh if job else sharding.MeshConfig())
  model, cfg = hf.load_model(checkpoint, dropless(job.model if job else Runtime()),
                             put=sharding.sharded_put(mesh))
  sharding.check_model_fits_mesh(cfg, mesh)
  ids = [tokenizer(p)["input_ids"] for p in prompts]
  for i, x in enumerate(ids):
    if not x:
      raise UserError(f"prompt {i + 1} tokenizes to no tokens")
  eos = jnp.asarray(() if F.ignore_eos else eos_ids(cfg, tokenizer), jnp.int32)
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
      tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
  greedy = F.temperature == 0
  graphdef, state = nnx.split(model)
  program = make_program(graphdef, F.max_new_tokens, greedy, mesh, pad_id)
  # Rows: a multiple of the mesh's batch shards; padding rows repeat the last prompt.
  per_call = F.batch_size or len(ids)
  rows = -(-per_call // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh)
  width = max(map(len, ids))  # one prompt width for every call: one program
  key = jax.random.key(F.seed)
  scalars = (jnp.float32(F.temperature or 1.0), jnp.float32(F.top_p), eos)
  results, calls, compile_s = [], [], 0.0  # calls: (seconds, new tokens) per call
  for lo in range(0, len(ids), per_call):
    chunk = ids[lo:lo + per_call]
    tokens = np.full((rows, width), pad_id, np.int32)
    lens = np.ones((rows,), np.int32)
    for i in range(rows):
      x = chunk[min(i, len(chunk) - 1)]
      tokens[i, :len(x)], lens[i] = x, len(x)
    args = (state, put_rows(mesh, tokens), put_rows(mesh, lens), jax.random.fold_in(key, lo),
            *scalars)
    if lo == 0:
      t0 = time.perf_counter()
      program = program.lower(*args).compile()
      compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, lengths = program(*args)
    out, lengths = sharding.to_host(out), sharding.to_host(lengths)
    seconds = time.perf_counter() - t0
    calls.append((seconds, 0))
    for i, x in enumerate(chunk):
      new = out[i, len(x):lengths[i]]
      calls[-1] = (seconds, calls[-1][1] + len(new))
      results.append({"prompt": prompts[lo + i],
                      "completion": tokenizer.decode(new, skip_special_tokens=True),
                      "new_tokens": len(new),
                      "stopped": "eos" if len(new) and int(new[-1]) in
                      set(np.asarray(eos).tolist()) else "max_new_tokens"})
  if jax.process_index() == 0:
    for r in results:
      print(json.dumps(r))
    print(summary(calls, len(results), greedy, rows, compile_s))
    sys.stdout.flush()


if __name__ == "__main__":
  run(main, extra_flags=(define_flags,))
