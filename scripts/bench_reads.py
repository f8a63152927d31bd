"""Training-batch reads from a cache: chunk-order loader vs random rows vs contiguous rows.

Usage: python scripts/bench_reads.py [--rows 1024] [--seq_len 1024] [--k 64] [--batch 64]
       [--rows_per_chunk 16] [--window 8] [--processes 2] [--dir /tmp/bench_reads]
Writes a synthetic zstd cache (random top-k ids and sorted bf16 logits: it compresses about
like a real one) under --dir, then times, per batch of --batch rows over one epoch:
  random      the previous reader: rows of a global permutation, read with one `oindex` read
              (every row decodes its whole chunk);
  contiguous  consecutive rows (the floor: each chunk decoded once, in order);
  loader      `moedistill.data.loader.Loader` (chunk permutation + shuffle window of --window
              chunks, async reads --prefetch steps ahead), with --compute_ms of simulated
              train step between batches (0 = reads only);
  process 0 of --processes P, reading its B/P rows of each global batch: from one lane
              shared by all processes (`read_lanes=1`: it decodes every window) against
              one lane per process (the default `read_lanes=P`: it decodes only its own
              chunks); ms per batch and row chunks decoded.
Reads go through no decoded-chunk cache pool (a cache at scale dwarfs any pool). Prints JSON
with ms per batch and the ratios to `random`. Deletes the cache afterwards.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moedistill.data import cache  # noqa: E402
from moedistill.data.loader import Loader  # noqa: E402


def make_cache(path: str, a) -> cache.CacheReader:
  meta = {"format": cache.FORMAT, "rows": a.rows, "seq_len": a.seq_len, "k": a.k,
          "temperatures": [1.0, 2.0], "rows_per_chunk": a.rows_per_chunk, "codec": "zstd",
          "complete": True}
  arrays = cache.open_arrays(path, meta, create=True)
  r = np.random.default_rng(0)
  step = a.rows_per_chunk * 8
  for lo in range(0, a.rows, step):
    n = min(step, a.rows - lo)
    logits = -np.sort(np.abs(r.standard_normal((n, a.seq_len, a.k))), -1) * 3
    futs = [arrays["tokens"][lo:lo + n].write(r.integers(0, 151936, (n, a.seq_len), np.int32)),
            arrays["segment_ids"][lo:lo + n].write(np.ones((n, a.seq_len), np.int32)),
            arrays["topk_idx"][lo:lo + n].write(r.integers(0, 151936, (n, a.seq_len, a.k),
                                                           np.int32)),
            arrays["topk_logit"][lo:lo + n].write(logits.astype(ml_dtypes.bfloat16)),
            arrays["lse"][lo:lo + n].write(r.standard_normal((n, a.seq_len, 2), np.float32))]
    for f in futs:
      f.result()
  arrays["done"].write(np.ones(arrays["done"].shape, np.uint8)).result()
  cache.write_metadata(path, meta)
  # No decoded-chunk cache pool: at scale the cache is far larger than any pool, so every
  # read decodes its chunks (a pool would flatter the random reads of a small cache).
  cache.CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
  return cache.CacheReader(path)


def timed(fn, steps: int, compute_ms: float) -> float:
  fn(0)  # warm-up (opens, first reads)
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    fn(s)
    time.sleep(compute_ms / 1000)
  return (time.perf_counter() - t0) / steps * 1000 - compute_ms


def main():
  ap = argparse.ArgumentParser()
  for name, default in [("rows", 1024), ("seq_len", 1024), ("k", 64), ("batch", 64),
                        ("rows_per_chunk", 16), ("window", 8), ("prefetch", 4),
                        ("processes", 2)]:
    ap.add_argument(f"--{name}", type=int, default=default)
  ap.add_argument("--compute_ms", type=float, default=0.0)
  ap.add_argument("--dir", default="/tmp/bench_reads")
  a = ap.parse_args()
  try:
    reader = make_cache(str(Path(a.dir) / "cache"), a)
    steps = a.rows // a.batch - 1
    perm = np.random.default_rng(0).permutation(a.rows)
    res = {"rows": a.rows, "seq_len": a.seq_len, "k": a.k, "batch": a.batch,
           "rows_per_chunk": a.rows_per_chunk, "window": a.window, "compute_ms": a.compute_ms,
           "disk_bytes_per_row": round(sum(f.stat().st_size for f in Path(a.dir).rglob("*")
                                           if f.is_file()) / a.rows)}
    ms = {"random": timed(lambda s: reader.read_rows(perm[s * a.batch:(s + 1) * a.batch]),
                          steps, a.compute_ms),
          "contiguous": timed(lambda s: reader.read_rows(np.arange(s * a.batch,
                                                                   (s + 1) * a.batch)),
                              steps, a.compute_ms)}
    loader = Loader(reader, a.batch, seed=0, window=a.window, prefetch=a.prefetch)
    ms["loader"] = timed(loader.batch, steps, a.compute_ms)
    res["speedup_vs_random"] = {k: round(ms["random"] / max(v, 1e-3), 2) for k, v in ms.items()}
    decoded = {}
    for name, lanes in [("p0_shared_lane", 1), ("p0_own_lane", a.processes)]:
      p0 = Loader(reader, a.batch, seed=0, process_count=a.processes, window=a.window,
                  prefetch=a.prefetch, lanes=lanes)
      ms[name] = timed(p0.batch, steps, a.compute_ms)
      decoded[name] = sum(p0.reads.values())
    res["ms_per_batch"] = {k: round(v, 1) for k, v in ms.items()}
    res["process_0_chunks_decoded"] = decoded
    print(json.dumps(res, indent=2))
  finally:
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
