"""Documents -> packed rows: text batches parsed in one thread, encoded by the Rust tokenizer
(`encode_batch_fast`, all cores, GIL released) in another, packed by the caller (the tokens
phase, `tokens.stage_piece`; the tiny teacher's corpus, `pack`)."""
from __future__ import annotations

import queue
import threading

import numpy as np

from moedistill.data import sources
from moedistill.data.sources import DataSpec

BATCH_CHARS = 4 * 2**20   # text per encode_batch call


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
