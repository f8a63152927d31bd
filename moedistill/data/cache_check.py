"""Finding and repairing damaged chunks of a cache (`cache_logits --verify` / `--repair`).

Every chunk of every array carries a crc32c (data/cache.py), so reading it proves it whole or
damaged (truncated, overwritten, undecodable). `damaged` reads every row chunk of every array
and returns the damaged ones; the resume marks (`done`, `tokens_done`) of a complete cache
must all be set. `mark_for_recompute` deletes the damaged chunk files and clears their marks,
so the logits phase (rerun by `--repair`, or by any rerun of cache_logits) recomputes exactly
those chunks, in the same batch positions as the first time: bit-identical. Damaged token
chunks are rebuilt by `repair_tokens` from a fresh tokens phase in `<path>/repair` (packing is
deterministic), whole shard files at a time, then that scratch store is deleted.
"""
from __future__ import annotations

import numpy as np
import tensorstore as ts

from moedistill.data import cache
from moedistill.errors import UserError

SCRATCH = "repair"  # where repair_tokens rebuilds the token rows (in cache.OWN_NAMES)
TOKEN_NAMES = ("tokens", "segment_ids", "tokens_done")


def _rows_per(name: str, meta: dict) -> int:
  """Rows per chunk of array `name` as stored (marks: one row chunk per element)."""
  return 1 if name in ("done", "packed_ids", "tokens_done") else meta["rows_per_chunk"]


def damaged(path: str, meta: dict, names=None) -> dict[str, list[int]]:
  """{array: sorted damaged row chunks} over `names` (default: every array of the cache);
  empty when all is whole. A mark that is not set in a complete cache counts as damage."""
  R, n = meta["rows_per_chunk"], meta["rows"]
  nc = cache.n_chunks(meta)
  layout = cache.array_layout(meta)
  names = [x for x in (names or layout) if x in layout]
  arrays = cache.open_arrays(path, meta, names=names, context=cache.ONCE)
  out: dict[str, set[int]] = {}
  for name in names:
    a = arrays[name]
    if name == "tokens_done":  # one element per row chunk, TOKEN_MARKS_PER_CHUNK per file
      per = cache.TOKEN_MARKS_PER_CHUNK
      reads = [(range(j, min(j + per, nc)), a[j:min(j + per, nc)].read())
               for j in range(0, nc, per)]
    elif _rows_per(name, meta) == 1:
      reads = [(range(c, c + 1), a[c:c + 1].read()) for c in range(nc)]
    else:
      reads = [(range(c, c + 1), a[c * R:min(c * R + R, n)].read()) for c in range(nc)]
    for chunks, f in reads:
      try:
        v = f.result()
      except ValueError:
        out.setdefault(name, set()).update(chunks)
        continue
      if name in ("done", "tokens_done") and meta.get("complete", True):
        out.setdefault(name, set()).update(c for c, x in zip(chunks, v) if not x)
  return {k: sorted(v) for k, v in out.items() if v}


def rows_text(meta: dict, chunks) -> str:
  """The rows of row chunks `chunks`, e.g. '8-11, 40-43'."""
  R, n = meta["rows_per_chunk"], meta["rows"]
  return ", ".join(f"{c * R}-{min(c * R + R, n) - 1}" for c in chunks)


def describe(path: str, meta: dict, bad: dict[str, list[int]]) -> list[str]:
  """One line per damaged array: its name and the rows of its damaged chunks."""
  return [f"cache {path}: array {name} damaged at rows {rows_text(meta, chunks)}"
          for name, chunks in bad.items()]


def _chunk_keys(kv: ts.KvStore, meta: dict, name: str, c: int):
  """Deletes the stored chunk `c` (along the rows) of array `name` (zarr3's default chunk
  key: c/<i>/<j>/..., one chunk across every other dimension)."""
  rank = len(cache.array_layout(meta)[name][1])
  key = "/".join([name, "c", str(c), *["0"] * (rank - 1)])
  return [kv.delete_range(ts.KvStore.KeyRange(key, key + "\0"))]


def mark_for_recompute(path: str, meta: dict, bad: dict[str, list[int]]) -> list[int]:
  """Deletes the damaged chunk files of the logit arrays, clears the `done` marks of their
  row chunks and marks the cache incomplete, so the logits phase recomputes exactly those
  chunks; returns the row chunks."""
  logit = cache.logit_arrays(meta)
  chunks = sorted({c for name, cs in bad.items() if name in logit for c in cs})
  if not chunks:
    return []
  kv = cache.kvstore(path)
  futures = [f for name in logit for c in chunks for f in _chunk_keys(kv, meta, name, c)]
  for f in futures:
    f.result()
  done = cache.open_arrays(path, meta, names=["done"])["done"]
  for c in chunks:
    done[c].write(np.uint8(0)).result()
  cache.write_metadata(path, {**meta, "complete": False})
  return chunks


def repair_tokens(path: str, meta: dict, bad: dict[str, list[int]], spec, tok) -> list[int]:
  """Rebuilds the damaged token chunks: the tokens phase again into `<path>/repair`, then
  every shard file holding a damaged chunk is deleted and written whole from there; returns
  the row chunks written."""
  from moedistill.data import tokens
  chunks = sorted({c for name, cs in bad.items() if name in TOKEN_NAMES for c in cs})
  if not chunks:
    return []
  scratch = cache.join(path, SCRATCH)
  cache.clear(scratch)
  fresh = tokens.build(spec, scratch, tok, rows_per_chunk=meta["rows_per_chunk"],
                       codec=meta["codec"], progress=False)
  if fresh["data_fingerprint"] != meta["data_fingerprint"] or fresh["rows"] != meta["rows"]:
    raise UserError(f"cache {path}: the data changed since the cache was made "
                          "(fingerprint differs); rebuild it with --overwrite")
  R, n, per = meta["rows_per_chunk"], meta["rows"], cache.TOKEN_MARKS_PER_CHUNK
  layout = cache.token_layout(n, meta["seq_len"], R)
  src = cache.open_arrays(scratch, fresh, layout=layout, context=cache.ONCE)
  kv = cache.kvstore(path)
  shards = sorted({c // per for c in chunks})
  for name in TOKEN_NAMES:
    for f in [f for j in shards for f in _chunk_keys(kv, meta, name, j)]:
      f.result()
  dst = cache.open_arrays(path, meta, layout=layout, context=cache.ONCE)
  for j in shards:
    rows = slice(j * per * R, min((j + 1) * per * R, n))
    marks = slice(j * per, min(j * per + per, cache.n_chunks(meta)))
    for name, sl in (("tokens", rows), ("segment_ids", rows), ("tokens_done", marks)):
      dst[name][sl].write(src[name][sl].read().result()).result()
  cache.clear(scratch)
  return [c for j in shards for c in range(j * per, min(j * per + per, cache.n_chunks(meta)))]
