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
the token arrays, when that is larger) whatever the dataset's size. With `max_rows` a process stops once the pieces before its next one cover it.

Odd documents follow rules and are counted in tokens.json `stats` (never dropped silently):
documents with no tokens are skipped (`empty_docs`), empty files too (`empty_files`); a
document longer than a row continues over the next rows, positions restarting in each
(`long_docs`). A record without the text field or a line that is not UTF-8/JSON stops the
build with one line naming the file and line.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from moedistill.data import cache, sources
from moedistill.data.sources import DataSpec
from moedistill.errors import ConfigError, UserError

FORMAT = "moedistill-tokens-v1"
META = "tokens.json"
STAGING = "staging/"
BATCH_CHARS = 4 * 2**20   # text per encode_batch call
PART_TOKENS = 2**21       # tokens per staged part (16 MiB with its segment ids)
IGNORED = ("complete", "stats", "rows", "files", "pieces")  # not settings: outcomes or stats


def _barrier(name: str):
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def encode(backend, texts: list[str]) -> list[list[int]]:
  return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


class Packer:
  """Documents -> rows of `seq_len` (each document + EOS, back to back); segment ids number
  the documents of a row 1, 2, ... (0 = padding), so a row alone is self-describing."""

  def __init__(self, seq_len: int, eos: int, pad: int):
    self.L, self.eos, self.pad = seq_len, eos, pad
    # The carry (less than a row): its tokens, and 1 where a document starts.
    self.tok, self.start = np.zeros(0, np.int32), np.zeros(0, np.int8)
    self.stats = {"docs": 0, "empty_docs": 0, "long_docs": 0, "tokens": 0}

  def add(self, ids: list[list[int]]):
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    if not lens.all():
      self.stats["empty_docs"] += int((lens == 0).sum())
      ids, lens = [x for x in ids if x], lens[lens > 0]
    self.stats["docs"] += len(ids)
    self.stats["long_docs"] += int((lens + 1 > self.L).sum())
    c = len(self.tok)
    ends = c + np.cumsum(lens + 1)
    starts = ends - lens - 1
    n = int(ends[-1]) if len(ends) else c
    self.stats["tokens"] += n - c
    flat, start = np.empty(n, np.int32), np.zeros(n, np.int8)
    flat[:c], start[:c] = self.tok, self.start
    for s, x in zip(starts.tolist(), ids):  # a list into a slice: converted in C
      flat[s:s + len(x)] = x
    flat[ends - 1] = self.eos
    start[starts] = 1
    m = n // self.L
    tok, first = flat[:m * self.L].reshape(m, self.L), start[:m * self.L].reshape(m, self.L)
    self.tok, self.start = flat[m * self.L:], start[m * self.L:]
    return tok, self._segments(first)

  @staticmethod
  def _segments(start):
    """Segment ids of rows [m, L] from their document-start flags: a row counts from 1."""
    start[:, 0] = 0
    seg = np.cumsum(start, axis=1, dtype=np.int32)
    seg += 1
    return seg

  def finish(self):
    n = len(self.tok)
    tok, seg = np.full((1, self.L), self.pad, np.int32), np.zeros((1, self.L), np.int32)
    if not n:
      return tok[:0], seg[:0]
    tok[0, :n], seg[0, :n] = self.tok, self._segments(self.start[None])[0]
    return tok, seg


def pack(ids: list[list[int]], seq_len: int, eos: int, pad: int):
  """All documents packed at once: (tokens [n, seq_len], segment ids [n, seq_len])."""
  packer = Packer(seq_len, eos, pad)
  (t, s), (t2, s2) = packer.add(ids), packer.finish()
  return np.concatenate([t, t2]), np.concatenate([s, s2])


def in_thread(gen, depth: int = 2):
  """Runs generator `gen` in a thread `depth` items ahead (exceptions re-raised here)."""
  q, end = queue.Queue(depth), object()

  def work():
    try:
      for x in gen:
        q.put(x)
      q.put(end)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      q.put(e)
  threading.Thread(target=work, daemon=True).start()
  while (x := q.get()) is not end:
    if isinstance(x, BaseException):
      raise x
    yield x


def text_batches(piece, spec: DataSpec):
  batch, chars = [], 0
  for t in sources.docs(piece, spec):
    batch.append(t)
    chars += len(t)
    if chars >= BATCH_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def id_batches(piece, spec: DataSpec, backend):
  """Token ids of the piece's text batches; run in a thread, batch n+1 is encoded (Rust, GIL
  released) while batch n is packed and written, and a second thread parses batch n+2."""
  for texts in in_thread(text_batches(piece, spec)):
    yield encode(backend, texts)


def _part_spec(path, g: int, j: int, shape):
  return {"driver": "zarr3", "kvstore": cache.kvstore_spec(path, f"{STAGING}{g:08d}/{j:05d}/"),
          "metadata": {"shape": list(shape), "data_type": "int32",
                       "chunk_grid": {"name": "regular", "configuration": {
                           "chunk_shape": list(shape)}},
                       "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                  {"name": "zstd", "configuration": {"level": 1}}]}}


class Staged:
  """Piece g's rows as staged parts, for when its offset is not known yet."""

  def __init__(self, path, g):
    self.path, self.g, self.parts = path, g, []

  def ready(self, m: int) -> int:
    return m

  def write(self, tok, seg) -> list:
    rows = np.stack([tok, seg], axis=1)  # [m, 2, L]
    arr = ts.open(_part_spec(self.path, self.g, len(self.parts), rows.shape), create=True,
                  delete_existing=True, context=cache.ONCE).result()
    self.parts.append(len(rows))
    return [arr.write(rows)]

  def record(self) -> dict:
    return {"parts": self.parts}


class Direct:
  """Piece rows written straight to the final arrays from row `at` (no staging, no assembly
  pass); rows from `limit` on (`max_rows`) are not written. Writes end on shard boundaries
  (`align` rows), so no shard is written twice, but for the one shared with the next piece."""

  def __init__(self, arrays, at: int, limit: int, align: int):
    self.arrays, self.at0, self.at, self.limit, self.align = arrays, at, at, limit, align

  def ready(self, m: int) -> int:
    return max(0, m - (self.at + m) % self.align)

  def write(self, tok, seg) -> list:
    lo, self.at = self.at, self.at + len(tok)
    n = max(0, min(self.at, self.limit) - lo)
    if n == 0:
      return []
    return [self.arrays["tokens"][lo:lo + n].write(tok[:n]),
            self.arrays["segment_ids"][lo:lo + n].write(seg[:n])]

  def record(self) -> dict:
    return {"at": self.at0}


def _wait(futures):
  for f in futures:
    f.result()


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
    _wait(pending)  # one write in flight: memory stays bounded
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
  _wait(pending)
  record = {"rows": rows, **sink.record(), "stats": packer.stats}
  cache.write_metadata(path, record, f"{STAGING}{g:08d}.json")
  return record


class Records:
  """The pieces' records, read once each; row offsets as prefix sums."""

  def __init__(self, path):
    self.path, self.known, self.sums = path, {}, [0]  # sums[i]: rows of pieces 0..i-1

  def get(self, g: int) -> dict | None:
    if g not in self.known:
      r = cache.read_metadata(self.path, f"{STAGING}{g:08d}.json")
      if r is None:
        return None
      self.known[g] = r
    return self.known[g]

  def put(self, g: int, record: dict):
    self.known[g] = record

  def offset(self, g: int, cap: int = 0) -> int | None:
    """Rows of pieces 0..g-1 when all are recorded, else None; with `cap`, counting stops
    once it reaches cap (so later pieces need no record)."""
    while len(self.sums) <= g and (not cap or self.sums[-1] < cap):
      r = self.get(len(self.sums) - 1)
      if r is None:
        return None
      self.sums.append(self.sums[-1] + r["rows"])
    return self.sums[min(g, len(self.sums) - 1)]


def stage_mine(path, spec: DataSpec, plist, tok, arrays, rows_per_chunk, p: int, P: int,
               progress: bool):
  """Process p's pieces, skipping those already done; stops early for max_rows. A piece
  whose offset is known (every earlier piece done: always with one process) is written
  straight to the final arrays, the others are staged for the assembly pass."""
  recs = Records(path)
  for g in tqdm(range(p, len(plist), P), unit="piece", desc=f"tokenizing {path}",
                disable=not progress, mininterval=1.0):
    if spec.max_rows and (recs.offset(g, spec.max_rows) or 0) >= spec.max_rows:
      return
    if recs.get(g) is None:
      at = recs.offset(g)
      sink = (Staged(path, g) if at is None else
              Direct(arrays, at, spec.max_rows or np.iinfo(np.int64).max,
                     rows_per_chunk * cache.TOKEN_MARKS_PER_CHUNK))
      recs.put(g, stage_piece(path, g, plist[g], spec, tok, sink))


def piece_table(path, n_pieces: int, max_rows: int):
  """(records, stats summed) over the prefix of pieces the rows come from."""
  kv = cache.kvstore(path)  # all records read at once: one round trip, not one per piece
  reads = [kv.read(f"{STAGING}{g:08d}.json") for g in range(n_pieces)]
  recs, stats, total = [], {}, 0
  for g in range(n_pieces):
    if max_rows and total >= max_rows:
      break
    r = cache.metadata_result(path, f"{STAGING}{g:08d}.json", reads[g].result)
    if r is None:
      raise UserError(f"cache {path}: piece {g} of the tokens phase is missing after all "
                      "processes finished (was the cache written by another run?)")
    recs.append(r)
    total += r["rows"]
    for k, v in r["stats"].items():
      stats[k] = stats.get(k, 0) + v
  return recs, stats


class _Rows:
  """Rows by global row range: staged parts (the last decoded one kept) or, for pieces
  written directly, the final arrays."""

  def __init__(self, path, records, arrays):
    self.path, self.records, self.arrays, self.last = path, records, arrays, (None, None)
    self.offsets = np.concatenate([[0], np.cumsum([r["rows"] for r in records])]).astype(
        np.int64)

  def _part(self, g, j):
    if self.last[0] != (g, j):
      arr = ts.open({"driver": "zarr3", "kvstore": cache.kvstore_spec(
          self.path, f"{STAGING}{g:08d}/{j:05d}/")}, context=cache.ONCE).result()
      self.last = ((g, j), arr.read().result())
    return self.last[1]

  def pieces(self, lo: int, hi: int) -> range:
    return range(int(np.searchsorted(self.offsets, lo, side="right")) - 1,
                 int(np.searchsorted(self.offsets, hi, side="left")))

  def rows(self, lo: int, hi: int) -> np.ndarray:
    out = []
    while lo < hi:
      g = self.pieces(lo, hi)[0]
      local = lo - self.offsets[g]
      if "at" in self.records[g]:
        take = min(hi, self.offsets[g + 1]) - lo
        out.append(np.stack([self.arrays[n][lo:lo + take].read().result()
                             for n in ("tokens", "segment_ids")], axis=1))
      else:
        starts = np.cumsum([0, *self.records[g]["parts"]])
        j = int(np.searchsorted(starts, local, side="right")) - 1
        take = min(hi - lo, starts[j + 1] - local)
        out.append(self._part(g, j)[local - starts[j]: local - starts[j] + take])
      lo += take
    return np.concatenate(out)


def _mark_batches(done: np.ndarray, per: int, p: int, P: int):
  """Process p's batches of `per` row chunks (a contiguous range of whole `tokens_done`
  chunks, so no two processes write one mark chunk), those not all marked done."""
  nb = -(-len(done) // per)
  mine = range(p * nb // P, (p + 1) * nb // P)
  lo_hi = ((b * per, min(b * per + per, len(done))) for b in mine)
  return [(lo, hi) for lo, hi in lo_hi if not done[lo:hi].all()]


def assemble_mine(path, meta: dict, records, p: int, P: int):
  """Marks process p's contiguous range of final row chunks done, one `tokens_done` chunk's
  worth of row chunks per batch; a batch holding rows of staged pieces is first copied from
  staging (batch b+1 read and its writes issued before batch b is waited on); rows written
  directly are only marked."""
  R, n = meta["rows_per_chunk"], meta["rows"]
  arrays = cache.open_arrays(path, meta, layout=cache.token_layout(n, meta["seq_len"], R),
                             context=cache.ONCE)
  marks = arrays["tokens_done"]
  done = marks.read().result()
  src = _Rows(path, records, arrays)
  pending, marking = None, []
  for lo, hi in _mark_batches(done, marks.chunk_layout.write_chunk.shape[0], p, P):
    sl = slice(lo * R, min(hi * R, n))
    writes = []
    if any("at" not in records[g] for g in src.pieces(sl.start, sl.stop)):
      rows = src.rows(sl.start, sl.stop)
      writes = [arrays["tokens"][sl].write(rows[:, 0]),
                arrays["segment_ids"][sl].write(rows[:, 1])]
    if pending:
      marking.append(_mark(marks, *pending))
    pending = (writes, lo, hi)
  if pending:
    marking.append(_mark(marks, *pending))
  for f in marking:
    f.result()


def _mark(marks, writes, lo, hi):
  _wait(writes)
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
    cache.kvstore(path).delete_range(ts.KvStore.KeyRange()).result()
    meta = {**new, "pieces": plist_len, "stats": {"empty_files": empty_files}}
    cache.write_metadata(path, meta, META)
  except (ValueError, OSError) as e:
    raise UserError(f"cache.path={path}: cannot write ({str(e).splitlines()[0][:160]})") from None
  return meta


def _precheck(spec: DataSpec, plist):
  """Bad input caught before anything is written: the first record of the first piece."""
  if not plist:
    raise ConfigError(f"data.source={list(spec.source)}: no documents (every file is empty)")
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
  """Runs the tokens phase (every process calls it); returns the complete tokens metadata."""
  import jax
  p, P = jax.process_index(), jax.process_count()
  plist, empty_files = sources.pieces(spec)
  _precheck(spec, plist)
  if p == 0:  # the others need no fingerprint: hashing is done once
    old = cache.read_metadata(path, META)
    new = settings(spec, rows_per_chunk, codec, old and old.get("files"), verify)
    _start(path, new, overwrite, len(plist), empty_files)
  _barrier(f"tokens {path} started")
  meta = cache.read_metadata(path, META)
  if meta.get("complete"):
    return meta
  if p == 0 and meta.get("rows") is None:
    _unsized_arrays(path, meta)
  _barrier(f"tokens {path} arrays")
  arrays = _open(path, meta)
  stage_mine(path, spec, plist, tok, arrays, rows_per_chunk, p, P, progress and p == 0)
  _barrier(f"tokens {path} staged")
  records, stats = piece_table(path, len(plist), spec.max_rows)
  total = sum(r["rows"] for r in records)
  n = min(total, spec.max_rows or total)
  if n == 0:
    raise ConfigError(f"data.source={list(spec.source)}: no rows after tokenization (every "
                      "document is empty)")
  if p == 0 and meta.get("rows") is None:
    for name, (_, shape) in cache.token_layout(n, spec.seq_len, rows_per_chunk).items():
      arrays[name].resize(exclusive_max=[shape[0], *[None] * (len(shape) - 1)],
                          resize_metadata_only=True).result()
    cache.write_metadata(path, {**meta, "rows": n}, META)
  _barrier(f"tokens {path} sized")
  meta = {**meta, "rows": n}
  assemble_mine(path, meta, records, p, P)
  _barrier(f"tokens {path} assembled")
  if p == 0:
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
