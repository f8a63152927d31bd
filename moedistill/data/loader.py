"""Training reads in chunk order: a pure function of (seed, step, process), read ahead.

Row order (`Order`): epoch e visits the cache's row chunks in a permutation drawn from
(seed, e); consecutive groups of `window` chunks form a shuffle window whose rows are
permuted together, drawn from (seed, e, w). The global batch at step n is rows
[n·B, (n+1)·B) of that endless sequence (epochs back to back), process p takes its slice.
Nothing depends on what was read before, so a resumed run needs only the step, and the
global batch is the same for any process count.

Reads (`Loader`): a window's chunks are read whole with async TensorStore reads, issued when
a step within `prefetch` steps ahead needs them, and kept until no later step does; so every
chunk is decoded once per epoch (per process) and reads overlap training. Random rows out of
compressed chunks would decode a chunk per row instead.
"""
from __future__ import annotations

import collections
import functools

import numpy as np

from moedistill.errors import UserError

NAMES = ("tokens", "segment_ids", "topk_idx", "topk_logit", "lse")


class Order:
  """Which rows come at which position of the endless, epoch-wise shuffled sequence."""

  def __init__(self, rows: int, rows_per_chunk: int, window: int, seed: int):
    self.rows, self.R, self.W, self.seed = rows, rows_per_chunk, window, seed
    self.n_chunks = -(-rows // rows_per_chunk)

  def chunk_rows(self, c) -> np.ndarray:
    return np.arange(c * self.R, min(c * self.R + self.R, self.rows))

  @functools.lru_cache(maxsize=4)
  def epoch(self, e: int):
    """(chunk permutation, row offset of each window in the epoch)."""
    perm = np.random.default_rng([self.seed, e]).permutation(self.n_chunks)
    sizes = np.minimum(self.R, self.rows - perm * self.R)
    per_window = np.add.reduceat(sizes, np.arange(0, self.n_chunks, self.W))
    return perm, np.concatenate([[0], np.cumsum(per_window)])

  def window_chunks(self, e: int, w: int) -> np.ndarray:
    return self.epoch(e)[0][w * self.W:(w + 1) * self.W]

  @functools.lru_cache(maxsize=8)
  def window_perm(self, e: int, w: int) -> np.ndarray:
    n = int(sum(len(self.chunk_rows(c)) for c in self.window_chunks(e, w)))
    return np.random.default_rng([self.seed, e, w]).permutation(n)

  def segments(self, start: int, count: int):
    """[(epoch, window, positions in the window's row list)] covering positions
    [start, start + count) of the sequence."""
    out = []
    while count > 0:
      e, pos = divmod(start, self.rows)
      offsets = self.epoch(e)[1]
      w = int(np.searchsorted(offsets, pos, side="right")) - 1
      take = min(count, int(offsets[w + 1]) - pos)
      out.append((e, w, self.window_perm(e, w)[pos - offsets[w]: pos - offsets[w] + take]))
      start, count = start + take, count - take
    return out

  def global_indices(self, start: int, count: int) -> np.ndarray:
    rows = []
    for e, w, local in self.segments(start, count):
      rows.append(np.concatenate([self.chunk_rows(c) for c in self.window_chunks(e, w)])[local])
    return np.concatenate(rows).astype(np.int64)


class Loader:
  """`batch(step)`: this process's rows of the global batch at `step`, read by window."""

  def __init__(self, reader, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, window: int = 8, prefetch: int = 4):
    if batch_size % process_count:
      raise UserError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    self.reader, self.prefetch = reader, prefetch
    self.per = batch_size // process_count
    self.B, self.p = batch_size, process_index
    self.order = Order(reader.rows, reader.meta["rows_per_chunk"], window, seed)
    self.windows = {}  # (epoch, window) -> {chunk: {name: future or array}}
    self.reads = collections.Counter()  # (epoch, chunk) -> reads issued (tests count them)

  def _segments(self, step: int):
    return self.order.segments(step * self.B + self.p * self.per, self.per)

  def _issue(self, key):
    if key in self.windows:
      return
    arrays = self.reader.arrays
    self.windows[key] = {int(c): {n: arrays[n][rows[0]: rows[-1] + 1].read() for n in NAMES}
                         for c in self.order.window_chunks(*key)
                         for rows in [self.order.chunk_rows(c)]}
    self.reads.update((key[0], c) for c in self.windows[key])

  def _chunks(self, key) -> list[dict[str, np.ndarray]]:
    """The window's decoded chunks in window order (each decoded once: the futures are
    replaced by their arrays)."""
    data = self.windows[key]
    if isinstance(data, dict):
      data = [self.reader.result(futs, self.order.chunk_rows(c)) for c, futs in data.items()]
      self.windows[key] = data
    return data

  def batch(self, step: int) -> dict[str, np.ndarray]:
    segments = self._segments(step)
    need = [(e, w) for e, w, _ in segments]
    ahead = {(e, w) for s in range(step, step + self.prefetch + 1)
             for e, w, _ in self._segments(s)}
    for key in sorted(ahead, key=lambda k: (k not in need, k)):
      self._issue(key)
    for key in [k for k in self.windows if k not in ahead]:
      del self.windows[key]  # no step from here on needs it
    out, pos = None, 0
    for e, w, local in segments:
      chunks = self._chunks((e, w))
      starts = np.cumsum([0] + [len(c["tokens"]) for c in chunks])
      which = np.searchsorted(starts, local, side="right") - 1
      if out is None:
        out = {n: np.empty((self.per, *chunks[0][n].shape[1:]), chunks[0][n].dtype)
               for n in NAMES}
      for j in np.unique(which):  # copy only the rows this process needs, chunk by chunk
        at = np.flatnonzero(which == j)
        for n in NAMES:
          out[n][pos + at] = chunks[j][n][local[at] - starts[j]]
      pos += len(local)
    return out
