"""Training-batch reads from a cache, in the same run: the chunk-order loader against random
rows (the baseline) and contiguous rows (the floor).

  python -m benchmarks.reads [--rows=1024] [--seq_len=1024] [--k=64] [--batch=64]
      [--rows_per_chunk=16] [--window=8] [--processes=2] [--dir=/tmp]

Writes a synthetic zstd cache (random top-k ids and sorted bf16 logits: it compresses about
like a real one) in a fresh directory under --dir, then times, per batch of --batch rows over
one epoch:
  random      rows of a global permutation, read with one `oindex` read (every row decodes
              its whole chunk);
  contiguous  consecutive rows (the floor: each chunk decoded once, in order);
  loader      `moedistill.data.loader.Loader` (chunk permutation + shuffle window of --window
              chunks, async reads --prefetch steps ahead), with --compute_ms of simulated
              train step between batches (0 = reads only);
  process 0 of --processes P, reading its B/P rows of each global batch: from one lane
              shared by all processes (`read_lanes=1`: it decodes every window) against
              one lane per process (the default `read_lanes=P`: it decodes only its own
              chunks); ms per batch and row chunks decoded.
Reads go through no decoded-chunk cache pool (a cache at scale dwarfs any pool). Records ms
per batch and the speed-ups over `random`. Deletes the cache afterwards.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common

for _name, _default, _help in [
    ("rows", 1024, "rows of the cache (one epoch)"), ("seq_len", 1024, "tokens per row"),
    ("k", 64, "top-k entries per token"), ("batch", 64, "rows per global batch"),
    ("rows_per_chunk", 16, "rows per zstd chunk"), ("window", 8, "loader shuffle window, chunks"),
    ("prefetch", 4, "loader steps read ahead"), ("processes", 2, "processes of the lane test")]:
  flags.DEFINE_integer(_name, _default, _help)
flags.DEFINE_float("compute_ms", 0.0, "simulated train step between batches")
flags.DEFINE_string("dir", "", "parent of the temporary cache directory (default: the "
                    "system's temporary directory)")
flags.DEFINE_bool("smoke", False, "a 64-row cache of 32 tokens (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def make_cache(path: str):
  import ml_dtypes
  import numpy as np
  import tensorstore as ts
  from moedistill.data import cache
  meta = {"format": cache.FORMAT, "rows": F.rows, "seq_len": F.seq_len, "k": F.k,
          "temperatures": [1.0, 2.0], "rows_per_chunk": F.rows_per_chunk, "codec": "zstd",
          "complete": True}
  arrays = cache.open_arrays(path, meta, create=True)
  r = np.random.default_rng(0)
  step, t, k = F.rows_per_chunk * 8, F.seq_len, F.k
  for lo in range(0, F.rows, step):
    n = min(step, F.rows - lo)
    logits = -np.sort(np.abs(r.standard_normal((n, t, k))), -1) * 3
    futs = [arrays["tokens"][lo:lo + n].write(r.integers(0, 151936, (n, t), np.int32)),
            arrays["segment_ids"][lo:lo + n].write(np.ones((n, t), np.int32)),
            arrays["topk_idx"][lo:lo + n].write(r.integers(0, 151936, (n, t, k), np.int32)),
            arrays["topk_logit"][lo:lo + n].write(logits.astype(ml_dtypes.bfloat16)),
            arrays["lse"][lo:lo + n].write(r.standard_normal((n, t, 2), np.float32))]
    for f in futs:
      f.result()
  arrays["done"].write(np.ones(arrays["done"].shape, np.uint8)).result()
  cache.write_metadata(path, meta)
  # No decoded-chunk cache pool: at scale the cache is far larger than any pool, so every
  # read decodes its chunks (a pool would flatter the random reads of a small cache).
  cache.CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
  return cache.CacheReader(path)


def ms_per_batch(fn, steps: int) -> float:
  """ms per call of fn(step) after one warm-up call (opens, first reads), less the simulated
  compute slept between calls."""
  fn(0)
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    fn(s)
    time.sleep(F.compute_ms / 1000)
  return (time.perf_counter() - t0) / steps * 1000 - F.compute_ms


def measure(work: Path) -> dict:
  import numpy as np
  from moedistill.data.loader import Loader
  reader = make_cache(str(work / "cache"))
  steps, b = F.rows // F.batch - 1, F.batch
  perm = np.random.default_rng(0).permutation(F.rows)
  res = {"rows": F.rows, "seq_len": F.seq_len, "k": F.k, "batch": b,
         "rows_per_chunk": F.rows_per_chunk, "window": F.window, "compute_ms": F.compute_ms,
         "disk_bytes_per_row": round(sum(f.stat().st_size for f in work.rglob("*")
                                         if f.is_file()) / F.rows)}
  ms = {"random": ms_per_batch(lambda s: reader.read_rows(perm[s * b:(s + 1) * b]), steps),
        "contiguous": ms_per_batch(lambda s: reader.read_rows(np.arange(s * b, (s + 1) * b)),
                                   steps)}
  loader = Loader(reader, b, seed=0, window=F.window, prefetch=F.prefetch)
  ms["loader"] = ms_per_batch(loader.batch, steps)
  res["speedup_vs_random"] = {k: round(ms["random"] / max(v, 1e-3), 2) for k, v in ms.items()}
  decoded = {}
  for name, lanes in [("p0_shared_lane", 1), ("p0_own_lane", F.processes)]:
    p0 = Loader(reader, b, seed=0, process_count=F.processes, window=F.window,
                prefetch=F.prefetch, lanes=lanes)
    ms[name] = ms_per_batch(p0.batch, steps)
    decoded[name] = sum(p0.reads.values())
  res["ms_per_batch"] = {k: round(v, 1) for k, v in ms.items()}
  res["process_0_chunks_decoded"] = decoded
  return res


def main(argv):
  del argv
  if F.smoke:
    F.rows, F.seq_len, F.k, F.batch, F.rows_per_chunk, F.window, F.prefetch = (
        64, 32, 8, 16, 4, 2, 2)
  work = Path(tempfile.mkdtemp(prefix="bench_reads_", dir=F.dir or None))
  try:
    res = measure(work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  res["peak_rss_gib"] = common.peak_rss_gib()
  common.emit("reads", res, F.out)


if __name__ == "__main__":
  app.run(main)
