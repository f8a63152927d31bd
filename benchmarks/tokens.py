"""The tokens phase at scale: peak RSS and tokens/s on generated jsonl corpora, against raw
`tokenizers` batch encoding measured in the same run.

  python -m benchmarks.tokens [--gb=1,4] [--tokenizer=bpe|word] [--dir=DIR] [--keep]

Writes a jsonl corpus of each size under --dir (Zipf-distributed words, documents of 30 to
1,500 words; a --block_mib block of distinct lines repeated), makes a tokenizer (`bpe`:
byte-level BPE, vocab 8,192, trained on a sample, like Qwen's; `word`: one id per word, much
faster, so the pipeline's own costs show), then measures:
  baseline   raw `tokenizers` `encode_batch_fast` over one block of the corpus's text already
             in memory (all cores), tokens/s, right before and right after each size's run
             (the ratio uses their mean: a shared machine's load drifts);
  tokens     `moedistill.data.tokens.build` (the `--phase=tokens` code) over the whole corpus in a
             child process: wall time from the call (after imports), tokens/s (packed tokens
             incl. EOS / wall), the child's peak RSS and CPU time (wait4 rusage of that child).
Records the ratio tokens/s / baseline, the same ratio in CPU seconds per token (all threads;
less sensitive to other jobs on a shared machine) and each size's peak RSS. Deletes the
corpora unless --keep.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common

flags.DEFINE_list("gb", ["1", "4"], "corpus sizes in GiB")
flags.DEFINE_string("dir", "/tmp/bench_tokens", "working directory (corpora, tokenizer, stores)")
flags.DEFINE_bool("keep", False, "keep --dir afterwards")
flags.DEFINE_enum("tokenizer", "bpe", ["bpe", "word"], "tokenizer to build")
flags.DEFINE_integer("block_mib", 64, "MiB of distinct lines the corpus repeats (also the "
                     "baseline's text)")
flags.DEFINE_bool("smoke", False, "a 1 MiB corpus, word tokenizer (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

CHILD = """
import sys, time, json
import jax  # loaded at startup by the command too: not part of the phase's time
from moedistill.data import sources, tokens
spec = sources.DataSpec(source=({corpus!r},), tokenizer={tok!r}, seq_len=1024)
tok = sources.load_tokenizer({tok!r})
phases = {{}}  # step -> [CPU s (all threads), wall s]

def timed(name, f):
  def run(*a, **k):
    c, t = time.process_time(), time.perf_counter()
    out = f(*a, **k)
    phases[name] = [round(time.process_time() - c, 2), round(time.perf_counter() - t, 2)]
    return out
  return run

for name in ("settings", "stage_mine", "assemble_mine"):  # fingerprint, tokenize, assemble
  setattr(tokens, name, timed(name, getattr(tokens, name)))
t0 = time.perf_counter()
meta = tokens.build(spec, {store!r}, tok, rows_per_chunk=16, codec="zstd", progress=False)
print(json.dumps({{"seconds": time.perf_counter() - t0, "rows": meta["rows"],
                  "stats": meta["stats"], "phases_cpu_wall": phases}}))
"""


def make_block(size: int, seed=0) -> bytes:
  import numpy as np
  r = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(r.choice(letters, int(r.integers(1, 11)))) for _ in range(50_000)]
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()
  lines, n = [], 0
  while n < size:
    doc = " ".join(np.asarray(words)[r.choice(len(words), int(r.integers(30, 1500)), p=p)])
    line = json.dumps({"text": doc}) + "\n"
    lines.append(line)
    n += len(line)
  return "".join(lines).encode()


def write_corpus(path: Path, gb: float, block: bytes):
  with open(path, "wb") as f:
    for _ in range(max(1, round(gb * 2**30 / len(block)))):
      f.write(block)


def make_tokenizer(block: bytes, out: Path, kind: str):
  """`bpe`: byte-level BPE (vocab 8,192) trained on a sample; `word`: one id per word
  (whitespace split), far faster, so the pipeline's own overhead shows."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  texts = [json.loads(x)["text"] for x in block[:8 * 2**20].decode().splitlines()[:-1]]
  if kind == "word":
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=8192, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)


def baseline(block: bytes, tok_dir: Path) -> tuple[float, float]:
  """(tokens/s, CPU seconds per million tokens, all threads) of plain batch encoding."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
  texts = [json.loads(x)["text"] for x in block.decode().splitlines()]
  batches = [texts[i:i + 1024] for i in range(0, len(texts), 1024)]
  t0, c0, n = time.perf_counter(), time.process_time(), 0
  for b in batches:
    n += sum(len(e.ids) for e in tok.encode_batch_fast(b, add_special_tokens=False))
  return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


def run_child(corpus: Path, tok_dir: Path, store: Path) -> dict:
  code = CHILD.format(corpus=str(corpus), tok=str(tok_dir), store=str(store))
  p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                       cwd=common.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  if status:
    raise SystemExit(f"child failed with status {status}")
  res = json.loads(out.strip().splitlines()[-1])
  res["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
  res["tokens_per_s"] = round(res["stats"]["tokens"] / res["seconds"])
  # CPU of the whole child (startup included), all threads: less sensitive to other load
  res["cpu_s_per_mtok"] = round((usage.ru_utime + usage.ru_stime) / res["stats"]["tokens"] * 1e6,
                                3)
  return res


def measure(work: Path) -> dict:
  block = make_block(F.block_mib * 2**20)
  make_tokenizer(block, work / "tok", F.tokenizer)
  res = {"cpu_count": os.cpu_count(), "tokenizer": F.tokenizer, "runs": []}
  for gb in [float(x) for x in F.gb]:
    corpus = work / f"corpus_{gb:g}gb.jsonl"
    write_corpus(corpus, gb, block)
    before = baseline(block, work / "tok")
    r = run_child(corpus, work / "tok", work / f"store_{gb:g}")
    after = baseline(block, work / "tok")
    base, base_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    r.update(corpus_bytes=corpus.stat().st_size, baseline_tokens_per_s=round(base),
             baseline_before_after=[round(before[0]), round(after[0])],
             ratio_to_baseline=round(r["tokens_per_s"] / base, 3),
             baseline_cpu_s_per_mtok=round(base_cpu, 3),
             cpu_ratio_to_baseline=round(base_cpu / r["cpu_s_per_mtok"], 3))
    res["runs"].append(r)
    corpus.unlink()
    shutil.rmtree(work / f"store_{gb:g}")
    print(json.dumps(r), flush=True)
  return res


def main(argv):
  del argv
  if F.smoke:
    F.gb, F.tokenizer, F.block_mib, F.keep = ["0.001"], "word", 1, False
  work = Path(F.dir)
  if F.smoke:
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="bench_tokens_"))
  work.mkdir(parents=True, exist_ok=True)
  try:
    res = measure(work)
  finally:
    if not F.keep:
      shutil.rmtree(work, ignore_errors=True)
  common.emit("tokens", res, F.out)


if __name__ == "__main__":
  app.run(main)
