"""Greedy exact match on held-out prompts of the demo corpus's four tasks (moedistill.data.corpus):
the report's generation metric for the teacher, the zero-shot and the distilled student.

Items. Each item is a prefix of one document of the corpus's held-out stream,
`corpus.documents(N, heldout_seed)` (seeds and counts from the teacher's training.json, written by
scripts/make_tiny_teacher.py): its first `heldout_docs` documents are exactly heldout.jsonl (the
eval split), later ones fresh documents of the same stream (`documents` draws sequentially, so
a longer stream extends the shorter one). A document whose text is also a training document
(`corpus.documents(train_docs, train_seed)`, i.e. train.jsonl) is skipped, so no prompt is cut
from a text the models were trained on. The task spaces are small by design (900 addition pairs,
a fixed world of 20 people), so an item's fact or sum itself also occurs in training: the metric
measures whether a model reproduces what the teacher learnt, not generalisation to new facts.

The answer is the continuation the corpus generator *forces* after the prompt, up to the first
point where the generator could choose (the answer's delimiter is part of it):
  arithmetic  first equation:  "12 + 7 ="            -> "19 ."      (also "25 - 14 =" -> "11 .")
  facts       first fact:      "alice lives in"      -> "paris ."   ("alice has a" -> "red cat .",
                                "the cat of alice is" -> "red .", "alice is from" -> "paris .")
  grammar     first sentence:  "the big child finds the old teacher" -> ". the" (a noun ends the
              object phrase, a second sentence always follows and starts with "the")
  brackets    "brackets : ( [ ] { }" -> ")" : a group holds one or two groups and nesting stops
              at depth 3, so after the second inner group, or after an opener at depth 3, the
              closer is forced, and after a second top-level group the document ends (EOS is
              then part of the answer). The cut is the one with the longest forced run of
              brackets (the first such), at least one bracket.

Exact match (`score`). The tokenizer splits on whitespace before BPE, so tok(prompt + " " +
answer) == tok(prompt) + tok(answer); answer ids A = tok(answer), plus the EOS id when the answer
ends the document. A model's greedy continuation C (decode.generate, len(A_max) new tokens, EOS
stops a row) matches iff C[:len(A)] == A: the answer's words (token for token) and its delimiter
("." / the forced "the" / EOS) all come out. Tokens after the answer are the generator's free
choice and are not scored. Per task: the fraction of that task's items matched; overall: the
fraction of all items (tasks have equal counts up to one).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from moedistill.data import corpus

TASKS = ("arithmetic", "brackets", "facts", "grammar")
OPENERS = {o: c for o, c in corpus.BRACKETS}
CLOSERS = set(OPENERS.values())
MAX_DEPTH = 3  # corpus._brackets: a group at depth 3 has no inner groups
MAX_GROUPS = 2  # corpus._brackets: one or two groups per sequence


@dataclasses.dataclass(frozen=True)
class Item:
  task: str
  prompt: str
  answer: str   # words, space separated
  eos: bool     # the answer ends the document (EOS is part of it)
  doc: int      # index of the source document in the held-out stream


def demo_corpus(teacher_dir) -> dict | None:
  """The corpus settings of a teacher made by scripts/make_tiny_teacher.py (its training.json),
  else None (another teacher: no known tasks)."""
  f = Path(teacher_dir) / "training.json"
  if not f.is_file():
    return None
  s = json.loads(f.read_text())
  keys = ("train_docs", "train_seed", "heldout_docs", "heldout_seed")
  return {k: int(s[k]) for k in keys} if all(k in s for k in keys) else None


def task_of(text: str) -> str:
  w = text.split()
  if w[0] == "brackets":
    return "brackets"
  if w[0].isdigit():
    return "arithmetic"
  if w[0] in corpus.NAMES or w[2] == "of":  # "the <pet> of <name> is <color> ."
    return "facts"
  return "grammar"


def _first_sentence(words):
  return words[:words.index(".") + 1]


def _arith_item(words):
  s = _first_sentence(words)  # a + b = s .
  return " ".join(s[:4]), " ".join(s[4:]), False


def _facts_item(words):
  s = _first_sentence(words)
  # "<n> lives in <c> ." | "<n> has a <color> <pet> ." | "<n> is from <c> ." |
  # "the <pet> of <n> is <color> .": everything after the template's last fixed word.
  cut = 5 if s[0] == "the" else 3
  return " ".join(s[:cut]), " ".join(s[cut:]), False


def _grammar_item(words):
  s = _first_sentence(words)
  return " ".join(s[:-1]), ". the", False


def _forced(tokens):
  """The brackets the generator forces after `tokens` (a prefix of one document's brackets),
  and whether the document must then end. Replays corpus._brackets: depth of an opener =
  open brackets before it; done[d] = groups finished in the current sequence at depth d."""
  stack, done = [], [0] * (len(tokens) + 2)
  for t in tokens:
    if t in OPENERS:
      done[len(stack) + 1] = 0
      stack.append(t)
    else:
      stack.pop()
      done[len(stack)] += 1
  out, last = [], tokens[-1]
  while True:
    if last in OPENERS:
      if len(stack) - 1 < MAX_DEPTH:
        return out, False  # inner group or close: a choice
      nxt = OPENERS[stack[-1]]
    else:
      if done[len(stack)] < MAX_GROUPS:
        return out, False  # another group or end the sequence: a choice
      if not stack:
        return out, True   # second top-level group closed: the document ends
      nxt = OPENERS[stack[-1]]
    out.append(nxt)
    stack.pop()
    done[len(stack)] += 1
    last = nxt


def _brackets_item(words):
  toks = words[2:]  # "brackets :" then the brackets
  best = None
  for i in range(1, len(toks)):
    out, eos = _forced(toks[:i])
    if out and (best is None or len(out) > len(best[1])):
      best = (i, out, eos)
  if best is None:
    return None
  i, out, eos = best
  assert toks[i:i + len(out)] == out and (not eos or i + len(out) == len(toks)), words
  return " ".join(words[:2 + i]), " ".join(out), eos


ITEM = {"arithmetic": _arith_item, "facts": _facts_item, "grammar": _grammar_item,
        "brackets": _brackets_item}


def held_out_items(n: int, settings: dict) -> list[Item]:
  """`n` items, the tasks in turn (equal counts up to one), each task's from the first
  held-out documents of its kind that are not training documents; deterministic."""
  want = {t: n // len(TASKS) + (i < n % len(TASKS)) for i, t in enumerate(TASKS)}
  train = set(corpus.documents(settings["train_docs"], settings["train_seed"]))
  found = {t: [] for t in TASKS}
  size, seen = settings["heldout_docs"], 0
  while True:
    docs = corpus.documents(size, settings["heldout_seed"])
    for j in range(seen, size):
      text = docs[j]
      t = task_of(text)
      if len(found[t]) >= want[t] or text in train:
        continue
      made = ITEM[t](text.split())
      if made is not None:
        found[t].append(Item(t, *made, doc=j))
    if all(len(found[t]) >= want[t] for t in TASKS):
      break
    if size >= 2**20:  # each kind is a quarter of the stream: only an absurd n gets here
      raise ValueError(f"gen_eval: {n} prompts need more than {size} held-out documents")
    seen, size = size, size * 2
  per = [found[t] for t in TASKS]
  return [per[k][i] for i in range(max(want.values())) for k in range(len(TASKS))
          if i < len(per[k])]


def encode(items, tokenizer, eos_id: int):
  """(prompt ids, answer ids) per item: each text tokenized alone (whitespace pre-split)."""
  enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
  return [(enc(it.prompt), enc(it.answer) + ([eos_id] if it.eos else [])) for it in items]


def score(items, answers, continuations) -> dict:
  """Exact match per task and overall: continuation[:len(answer)] == answer, token for token
  (module docstring). `continuations`: the new token ids of each row (EOS kept)."""
  hits = {t: [] for t in TASKS}
  for it, a, c in zip(items, answers, continuations):
    hits[it.task].append(list(c[:len(a)]) == list(a))
  out = {t: float(np.mean(h)) for t, h in hits.items() if h}
  out["overall"] = float(np.mean([x for h in hits.values() for x in h]))
  out["prompts"] = len(items)
  return out


@functools.lru_cache(maxsize=8)
def _program(graphdef, max_new_tokens: int, mesh, pad_id: int):
  """One jitted greedy decode.generate per (graphdef, length, mesh): the teacher and merged
  students of one config share it, so the report compiles once (compiling is most of the
  time: 8 to 16 s against 0.2 to 0.3 s for running 64 prompts, tiny teacher, loaded 2-core CPU)."""
  from moedistill.generate import make_program
  return make_program(graphdef, max_new_tokens, True, mesh, pad_id)


def greedy_continuations(model, prompt_ids, max_new_tokens: int, eos_ids, pad_id: int,
                         mesh=None) -> list[np.ndarray]:
  """New tokens of each prompt (EOS kept, nothing after it), greedy, one jitted batched
  decode.generate over all prompts (rows padded to a multiple of the mesh's batch shards)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moedistill import sharding
  from moedistill.generate import put_rows
  mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
  graphdef, state = nnx.split(model)
  d = sharding.batch_divisor(mesh)
  rows = -(-len(prompt_ids) // d) * d
  width = max(map(len, prompt_ids))
  tokens = np.full((rows, width), pad_id, np.int32)
  lens = np.ones((rows,), np.int32)
  for i in range(rows):
    x = prompt_ids[min(i, len(prompt_ids) - 1)]
    tokens[i, :len(x)], lens[i] = x, len(x)
  program = _program(graphdef, max_new_tokens, mesh, pad_id)
  out, lengths = program(state, put_rows(mesh, tokens), put_rows(mesh, lens), jax.random.key(0),
                         jnp.float32(1.0), jnp.float32(1.0), jnp.asarray(eos_ids, jnp.int32))
  out, lengths = sharding.to_host(out), sharding.to_host(lengths)
  return [out[i, len(x):lengths[i]] for i, x in enumerate(prompt_ids)]


def evaluate(model, items, tokenizer, eos_id: int, pad_id: int, mesh=None) -> dict:
  """score() of `model`'s greedy continuations of `items`."""
  enc = encode(items, tokenizer, eos_id)
  n = max(len(a) for _, a in enc)
  cont = greedy_continuations(model, [p for p, _ in enc], n, (eos_id,), pad_id, mesh)
  return score(items, [a for _, a in enc], cont)


def load_plain(path, runtime, mesh):
  """(model, config) of a checkpoint, a compressed (shared-core) one as its merged plain
  Qwen3-MoE (W_e = core + A_e B_e, hf.save_model(merged=True) into a temporary directory, as
  `train` writes the export), so that teacher and students of one config share one compiled
  decode program. The merged model computes the same function up to float rounding
  (tests/model/test_generate.py: native and merged students decode the same greedy tokens).
  With several processes the native model is kept (a temporary directory is per host)."""
  import jax

  from moedistill import sharding
  from moedistill.hub import hf
  put = sharding.sharded_put(mesh)
  model, cfg = hf.load_model(path, runtime, put=put)
  if model.compression is None or jax.process_count() > 1:
    return model, cfg
  with tempfile.TemporaryDirectory() as tmp:
    merged = hf.save_model(model, Path(tmp) / "merged", merged=True)
    del model
    return hf.load_model(merged, runtime, put=put)


def report_figures(job, paths: dict, mesh=None) -> dict:
  """{row key: exact-match figures} for the report's models (`paths`: key -> checkpoint),
  or {} when off (job.gen_prompts == 0) or when the teacher is not the demo's (no
  training.json with corpus seeds, so no tasks with known answers). Every process calls it."""
  n = getattr(job, "gen_prompts", 0)
  settings = demo_corpus(job.teacher)
  if not n or settings is None:
    return {}
  from transformers import AutoTokenizer

  from moedistill import sharding
  from moedistill.generate import dropless
  from moedistill.model import resolve
  tokenizer = AutoTokenizer.from_pretrained(job.train_data.tokenizer)
  items = held_out_items(n, settings)
  mesh = mesh or sharding.make_mesh(job.mesh)
  runtime = dropless(resolve.dropless(job.model))  # exact routing, as the report's figures
  out = {}
  for key, path in paths.items():
    model, cfg = load_plain(path, runtime, mesh)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id
    out[key] = evaluate(model, items, tokenizer, int(eos), int(pad or 0), mesh)
  return out


def print_table(report: dict, rows) -> None:
  """The exact-match table under the report's, when the report has the figures."""
  if not any("gen_exact_match" in report.get(k, {}) for k, _ in rows):
    return
  n = next(report[k]["gen_exact_match"]["prompts"] for k, _ in rows
           if "gen_exact_match" in report.get(k, {}))
  print(f"{f'greedy exact match ({n})':<26}" + "".join(f"{t:>11}" for t in (*TASKS, "overall")))
  for key, name in rows:
    g = report.get(key, {}).get("gen_exact_match")
    if g is not None:
      print(f"{name:<26}" + "".join(f"{g.get(t, math.nan):>11.3f}" for t in (*TASKS, "overall")))
