"""The tokens phase: documents -> packed rows in a cache's `tokens` / `segment_ids` arrays.

Resumable and split between processes:
1. Pieces (`sources.pieces`: fixed by the data alone) go round-robin, piece g to process g % P.
   Each is streamed through three threads (one parses text batches, one encodes them with the
   Rust tokenizer's `encode_batch_fast` on all cores, this one packs and writes the previous
   batch) and packed on its own (documents + EOS, the last row padded). A piece whose row
   offset is known (every earlier piece is done: always so with one process) is written
   straight to the final arrays, created at a row bound and cut to the row count at the end;
   the others are staged as `staging/<g>/<part>`. `staging/<g>.json` (its row count and
   where its rows are), written last, marks a piece done.
2. After a barrier every piece's row offset is a prefix sum; each process takes a contiguous
   range of whole `tokens_done` chunks (64 row chunks each, one shard file of the token
   arrays), copies the staged rows there and marks them; then the staging area is deleted.
So the rows are the same for any process count, a killed run redoes at most one piece per
process plus unmarked chunks, and memory is one text batch and one part (or one shard of
the token arrays, when that is larger) whatever the dataset's size. With `max_rows` a
process stops once the pieces before its next one cover it.

Odd documents follow rules and are counted in tokens.json `stats` (never dropped silently):
documents with no tokens are skipped (`empty_docs`), empty files too (`empty_files`); a
document longer than a row continues over the next rows, positions restarting in each
(`long_docs`). A record without the text field or a line that is not UTF-8/JSON stops the
build with one line naming the file and line.
"""
from __future__ import annotations

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from moedistill.data import cache, sources
from moedistill.data.packing import Packer, id_batches, in_thread
from moedistill.data.piece_rows import (STAGING, Direct, PieceRows, Records, Staged,
                                         record_name, wait_all)
from moedistill.data.sources import DataSpec
from moedistill.errors import ConfigError, UserError, reason

FORMAT = "moedistill-tokens-v1"
META = "tokens.json"
PART_TOKENS = 2**21       # tokens per staged part (16 MiB with its segment ids)
IGNORED = ("complete", "stats", "rows", "files", "pieces")  # not settings: outcomes or stats


def _barrier(name: str):
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def stage_piece(path: str, g: int, piece, spec: DataSpec, tok, sink) -> dict:
  """Tokenizes and packs piece g into `sink` (`Direct` or `Staged`), then writes its record
  (rows, stats, where its rows are) as `staging/<g>.json`, which marks it done."""
  packer = Packer(spec.seq_len, tok.eos_token_id,
                  tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
  blocks, pending, rows = [], [], 0

  def flush(last: bool):
    nonlocal blocks, pending
    t, s = (np.concatenate([b[i] for b in blocks]) for i in (0, 1))
    k = len(t) if last else sink.ready(len(t))
    wait_all(pending)  # one write in flight: memory stays bounded
    pending, blocks = sink.write(t[:k], s[:k]), [(t[k:], s[k:])]

  for ids in in_thread(id_batches(piece, spec, tok.backend_tokenizer)):
    blocks.append(packer.add(ids))
    rows += len(blocks[-1][0])
    held = sum(len(t) for t, _ in blocks)
    if held * spec.seq_len >= PART_TOKENS and sink.ready(held):
      flush(last=False)
  blocks.append(packer.finish())
  rows += len(blocks[-1][0])
  if sum(len(t) for t, _ in blocks):
    flush(last=True)
  wait_all(pending)
  record = {"rows": rows, **sink.record(), "stats": packer.stats}
  cache.write_metadata(path, record, record_name(g))
  return record


def stage_mine(path, spec: DataSpec, pieces, tok, arrays, rows_per_chunk, proc: int,
               nprocs: int, progress: bool):
  """Process proc's pieces (piece g to process g mod nprocs), skipping those already done;
  stops early for max_rows. A piece whose offset is known (every earlier piece done: always
  with one process) is written straight to the final arrays, the others are staged for the
  assembly pass."""
  recs = Records(path)
  mine = range(proc, len(pieces), nprocs)
  bar = tqdm(total=len(mine), unit="piece", desc=f"tokenizing {path}", disable=not progress,
             mininterval=1.0)
  for piece in mine:
    if spec.max_rows and (recs.offset(piece, spec.max_rows) or 0) >= spec.max_rows:
      break
    if recs.get(piece) is None:
      at = recs.offset(piece)
      sink = (Staged(path, piece) if at is None else
              Direct(arrays, at, spec.max_rows or np.iinfo(np.int64).max,
                     rows_per_chunk * cache.TOKEN_MARKS_PER_CHUNK))
      recs.put(piece, stage_piece(path, piece, pieces[piece], spec, tok, sink))
    bar.update(1)
  # Closed here only: a refusal raised above leaves the bar open and `cli.fail` erases it, so
  # the error line stands alone (tqdm's iterator form would redraw it on the way out).
  bar.close()


def piece_table(path, n_pieces: int, max_rows: int):
  """(records, stats summed) over the prefix of pieces the rows come from."""
  kv = cache.kvstore(path)  # all records read at once: one round trip, not one per piece
  reads = [kv.read(record_name(g)) for g in range(n_pieces)]
  recs, stats, total = [], {}, 0
  for g in range(n_pieces):
    if max_rows and total >= max_rows:
      break
    r = cache.metadata_result(path, record_name(g), reads[g].result)
    if r is None:
      raise UserError(f"cache {path}: piece {g} of the tokens phase is missing after all "
                      "processes finished (was the cache written by another run?)")
    recs.append(r)
    total += r["rows"]
    for k, v in r["stats"].items():
      stats[k] = stats.get(k, 0) + v
  return recs, stats


def _mark_batches(done: np.ndarray, per: int, proc: int, nprocs: int):
  """Process proc's batches of `per` row chunks (a contiguous range of whole `tokens_done`
  chunks, so no two processes write one mark chunk), those not all marked done."""
  n_batches = -(-len(done) // per)
  mine = range(proc * n_batches // nprocs, (proc + 1) * n_batches // nprocs)
  lo_hi = ((b * per, min(b * per + per, len(done))) for b in mine)
  return [(lo, hi) for lo, hi in lo_hi if not done[lo:hi].all()]


def assemble_mine(path, meta: dict, records, proc: int, nprocs: int):
  """Marks process proc's contiguous range of final row chunks done, one `tokens_done` chunk's
  worth of row chunks per batch; a batch holding rows of staged pieces is first copied from
  staging (batch b+1 read and its writes issued before batch b is waited on); rows written
  directly are only marked."""
  rows_per_chunk, rows = meta["rows_per_chunk"], meta["rows"]
  arrays = cache.open_arrays(path, meta, context=cache.ONCE,
                             layout=cache.token_layout(rows, meta["seq_len"], rows_per_chunk))
  marks = arrays["tokens_done"]
  done = marks.read().result()
  src = PieceRows(path, records, arrays)
  pending, marking = None, []
  for lo, hi in _mark_batches(done, marks.chunk_layout.write_chunk.shape[0], proc, nprocs):
    sl = slice(lo * rows_per_chunk, min(hi * rows_per_chunk, rows))
    writes = []
    if any("at" not in records[piece] for piece in src.pieces(sl.start, sl.stop)):
      staged = src.rows(sl.start, sl.stop)
      writes = [arrays["tokens"][sl].write(staged[:, 0]),
                arrays["segment_ids"][sl].write(staged[:, 1])]
    if pending:
      marking.append(_mark(marks, *pending))
    pending = (writes, lo, hi)
  if pending:
    marking.append(_mark(marks, *pending))
  for f in marking:
    f.result()


def _mark(marks, writes, lo, hi):
  wait_all(writes)
  return marks[lo:hi].write(np.ones(hi - lo, np.uint8))


def settings(spec: DataSpec, rows_per_chunk: int, codec: str, old_files=None,
             verify: bool = False) -> dict:
  """The tokens metadata the config asks for; file hashes reuse `old_files` where a file's
  size and mtime are unchanged (all re-hashed with `verify`)."""
  files = sources.file_records(spec, old_files, verify)
  # Settings before fingerprints: a refusal names the first difference, and the fingerprint
  # covers the settings too (a changed seq_len should be reported as seq_len).
  return {"format": FORMAT, "seq_len": spec.seq_len, "rows_per_chunk": rows_per_chunk,
          "codec": codec, "tokenizer_hash": sources.tokenizer_hash(spec.tokenizer),
          "data_fingerprint": sources.fingerprint(spec, files), "files": files, "complete": False}


def check_existing(path: str, new: dict, overwrite: bool) -> dict | None:
  """The tokens metadata already at `path` when it matches `new`; refuses a mismatch unless
  `overwrite`; None when there is nothing to keep."""
  old = cache.read_metadata(path, META)
  if old is None:
    if cache.read_metadata(path) is not None and not overwrite:
      raise UserError(f"cache.path={path} holds a cache made before the tokens phase existed; "
                      "pass --overwrite to replace it")
    return None
  diff = cache.first_difference(old, new, IGNORED)
  if diff is None:
    return old
  if not overwrite:
    raise UserError(f"cache.path={path} holds tokens made with different {diff} "
                    f"({old.get(diff)!r} vs {new.get(diff)!r}); pass --overwrite to replace it")
  return None


def finished(spec: DataSpec, path: str, rows_per_chunk: int, codec: str,
             verify: bool = False) -> dict | None:
  """The complete tokens metadata matching the config (cheap: stats the files, re-hashes only
  changed ones), or None; refuses tokens made with other settings."""
  old = cache.read_metadata(path, META)
  if old is None or not old.get("complete"):
    return None
  new = settings(spec, rows_per_chunk, codec, old.get("files"), verify)
  check_existing(path, new, overwrite=False)
  return old


def _start(path, new, overwrite, plist_len, empty_files):
  """Process 0: keep a matching store (resume), or clear the path and write fresh metadata."""
  old = check_existing(path, new, overwrite)
  if old is not None:
    return old
  try:
    cache.clear(path)  # refuses a path holding what moedistill did not write
    meta = {**new, "pieces": plist_len, "stats": {"empty_files": empty_files}}
    cache.write_metadata(path, meta, META)
  except (ValueError, OSError) as e:
    raise UserError(f"cache.path={path}: cannot write ({reason(e)})") from None
  return meta


def _precheck(spec: DataSpec, plist):
  """Bad input caught before anything is written: the first record of the first piece."""
  if not plist:
    raise ConfigError(f"{spec.name}={list(spec.source)}: no documents (every file is empty)")
  next(sources.docs(plist[0], spec), None)


# The final arrays' row bound until the row count is known: pieces are written to them as
# soon as their offset is known, and the arrays are then cut to the count (metadata only).
ROW_BOUND = 2**40


def _open(path, meta):
  return cache.open_arrays(path, meta, context=cache.ONCE, layout=cache.token_layout(
      ROW_BOUND, meta["seq_len"], meta["rows_per_chunk"]))


def _unsized_arrays(path, meta):
  """Process 0: the final arrays at ROW_BOUND rows; those a killed run made (perhaps not all
  of them, perhaps already cut to the row count) are kept."""
  layout = cache.token_layout(ROW_BOUND, meta["seq_len"], meta["rows_per_chunk"])
  for name in layout:
    try:
      cache.open_arrays(path, meta, names=[name], layout=layout, context=cache.ONCE)
    except UserError:
      cache.open_arrays(path, meta, create=True, names=[name], layout=layout,
                        context=cache.ONCE)


def build(spec: DataSpec, path: str, tok, *, rows_per_chunk: int, codec: str,
          overwrite: bool = False, verify: bool = False, progress: bool = True) -> dict:
  """Runs the tokens phase (every process calls it); returns the complete tokens metadata.
  Each step below ends in a barrier every process reaches; work only process 0 does (the
  fingerprint, metadata, resizes) happens inside a step, before its barrier."""
  import jax
  proc, nprocs = jax.process_index(), jax.process_count()
  pieces, empty_files = sources.pieces(spec)
  _precheck(spec, pieces)
  meta = _started(spec, path, pieces, empty_files, rows_per_chunk, codec, overwrite, verify,
                  proc)
  if meta.get("complete"):
    return meta
  arrays = _arrays_opened(path, meta, proc)
  stage_mine(path, spec, pieces, tok, arrays, rows_per_chunk, proc, nprocs,
             progress and proc == 0)
  _barrier(f"tokens {path} staged")
  meta, records, stats = _sized(spec, path, meta, arrays, len(pieces), rows_per_chunk, proc)
  assemble_mine(path, meta, records, proc, nprocs)
  _barrier(f"tokens {path} assembled")
  return _completed(path, meta, stats, proc)


def _started(spec, path, pieces, empty_files, rows_per_chunk, codec, overwrite, verify,
             proc) -> dict:
  """Process 0 fingerprints the data once and starts (or resumes) the store; every process
  then reads its metadata."""
  if proc == 0:
    old = cache.read_metadata(path, META)
    new = settings(spec, rows_per_chunk, codec, old and old.get("files"), verify)
    _start(path, new, overwrite, len(pieces), empty_files)
  _barrier(f"tokens {path} started")
  return cache.read_metadata(path, META)


def _arrays_opened(path, meta, proc):
  """The token arrays, created by process 0 at a row bound when the row count is unknown."""
  if proc == 0 and meta.get("rows") is None:
    _unsized_arrays(path, meta)
  _barrier(f"tokens {path} arrays")
  return _open(path, meta)


def _sized(spec, path, meta, arrays, n_pieces, rows_per_chunk, proc):
  """Every piece is staged: the row count is known; process 0 cuts the arrays to it (a
  metadata-only resize) and records it. Returns (metadata with rows, piece records, stats)."""
  records, stats = piece_table(path, n_pieces, spec.max_rows)
  total = sum(r["rows"] for r in records)
  rows = min(total, spec.max_rows or total)
  if rows == 0:
    raise ConfigError(f"{spec.name}={list(spec.source)}: no rows after tokenization (every "
                      "document is empty)")
  if proc == 0 and meta.get("rows") is None:
    for name, (_, shape) in cache.token_layout(rows, spec.seq_len, rows_per_chunk).items():
      arrays[name].resize(exclusive_max=[shape[0], *[None] * (len(shape) - 1)],
                          resize_metadata_only=True).result()
    cache.write_metadata(path, {**meta, "rows": rows}, META)
  _barrier(f"tokens {path} sized")
  return {**meta, "rows": rows}, records, stats


def _completed(path, meta, stats, proc) -> dict:
  """Process 0 marks the store complete and deletes the staged pieces."""
  if proc == 0:
    meta.update(complete=True, stats={**meta["stats"], **stats})
    cache.write_metadata(path, meta, META)
    cache.kvstore(path).delete_range(ts.KvStore.KeyRange(STAGING, STAGING[:-1] + "0")).result()
  _barrier(f"tokens {path} complete")
  return meta


def write_rows(path: str, tokens_nl, segment_ids_nl, *, rows_per_chunk: int, codec: str,
               fingerprint: str, tokenizer_hash: str) -> dict:
  """A complete token store from arrays in memory (benchmarks and tests of the logits phase)."""
  n, L = tokens_nl.shape
  meta = {"format": FORMAT, "data_fingerprint": fingerprint, "tokenizer_hash": tokenizer_hash,
          "seq_len": L, "rows_per_chunk": rows_per_chunk, "codec": codec, "files": None,
          "rows": n, "complete": True, "stats": {}}
  arrays = cache.open_arrays(path, meta, create=True,
                             layout=cache.token_layout(n, L, rows_per_chunk))
  arrays["tokens"].write(tokens_nl).result()
  arrays["segment_ids"].write(segment_ids_nl).result()
  arrays["tokens_done"].write(np.ones(arrays["tokens_done"].shape, np.uint8)).result()
  cache.write_metadata(path, meta, META)
  return meta
