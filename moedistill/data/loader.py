"""Training reads in chunk order: a pure function of (seed, lanes, step, process), read ahead.

Lanes (`cache.read_lanes`, default the process count): the row chunks are dealt to lanes,
chunk c to lane c % lanes, and the global batch of B rows is the lanes' rows side by side,
B / lanes from each. A process takes its contiguous slice of the global batch, so it reads
only the chunks of the lanes under that slice: with one lane per process, each process
decodes 1/P of the cache per epoch instead of all of it. The global batch depends on the
lane count, not on the process count, so a run resumes exactly on any number of processes
as long as it keeps its lanes (the trainer records them in its checkpoints).

Row order of a lane (`Order`): its epoch e visits the lane's chunks in a permutation drawn
from (seed, e); consecutive groups of `window` chunks form a shuffle window whose rows are
permuted together, drawn from (seed, e, w) (with more than one lane, the seed is extended by
the lane count and the lane). Step n takes rows [n·b, (n+1)·b) of that endless sequence
(epochs back to back, b = B / lanes). Nothing depends on what was read before, so a resumed
run needs only the step.

Reads (`Loader`): a window's chunks are read whole with async TensorStore reads, issued when
a step within `prefetch` steps ahead needs them, and kept until no later step does; so every
chunk is decoded once per epoch and reads overlap training. Random rows out of compressed
chunks would decode a chunk per row instead.
"""
from __future__ import annotations

import collections
import functools

import numpy as np

from moedistill.errors import UserError

NAMES = ("tokens", "segment_ids", "topk_idx", "topk_logit", "lse")


class Order:
  """Which rows come at which position of one lane's endless, epoch-wise shuffled sequence."""

  def __init__(self, rows: int, rows_per_chunk: int, window: int, seed: int, lanes: int = 1,
               lane: int = 0):
    self.total, self.R, self.W = rows, rows_per_chunk, window
    self.chunks = np.arange(lane, -(-rows // rows_per_chunk), lanes)
    self.rows = int(np.minimum(self.R, rows - self.chunks * self.R).sum())
    self.key = [seed] if lanes == 1 else [seed, lanes, lane]
    # Caches per lane: a method's lru_cache is shared by every instance, so a process reading
    # several lanes would evict one lane's epoch permutation (all its chunks) for another's.
    self.epoch = functools.lru_cache(maxsize=4)(self._epoch)
    self.window_perm = functools.lru_cache(maxsize=8)(self._window_perm)

  def chunk_rows(self, c) -> np.ndarray:
    return np.arange(c * self.R, min(c * self.R + self.R, self.total))

  def _epoch(self, e: int):
    """(chunk permutation, row offset of each window in the epoch)."""
    perm = self.chunks[np.random.default_rng(self.key + [e]).permutation(len(self.chunks))]
    sizes = np.minimum(self.R, self.total - perm * self.R)
    per_window = np.add.reduceat(sizes, np.arange(0, len(perm), self.W))
    return perm, np.concatenate([[0], np.cumsum(per_window)])

  def window_chunks(self, e: int, w: int) -> np.ndarray:
    return self.epoch(e)[0][w * self.W:(w + 1) * self.W]

  def _window_perm(self, e: int, w: int) -> np.ndarray:
    n = int(sum(len(self.chunk_rows(c)) for c in self.window_chunks(e, w)))
    return np.random.default_rng(self.key + [e, w]).permutation(n)

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
               process_count: int = 1, window: int = 8, prefetch: int = 4, lanes: int = 1):
    R = reader.meta["rows_per_chunk"]
    if batch_size % process_count:
      raise UserError(f"train.batch_size={batch_size} is not divisible by {process_count} "
                      "processes")
    if batch_size % lanes:
      raise UserError(f"train.batch_size={batch_size} is not divisible by cache.read_lanes="
                      f"{lanes} (each lane gives batch_size / read_lanes rows a step)")
    if lanes > -(-reader.rows // R):
      raise UserError(f"{lanes} read lanes (cache.read_lanes; its default 0 means one per "
                      f"process) are more than the cache's {-(-reader.rows // R)} row chunks, "
                      "and each lane needs its own; set cache.read_lanes=1 for a cache this "
                      "small")
    self.reader, self.prefetch = reader, prefetch
    per = batch_size // process_count
    self.lo, self.hi = process_index * per, (process_index + 1) * per  # in the global batch
    self.b = batch_size // lanes  # rows per lane and step
    self.orders = [Order(reader.rows, R, window, seed, lanes, i) for i in range(lanes)]
    self.windows = {}  # (lane, epoch, window) -> {chunk: {name: future or array}}
    self.reads = collections.Counter()  # (epoch, chunk) -> reads issued (tests count them)

  def _segments(self, step: int):
    """[(lane, epoch, window, positions)] of this process's slice of the step's batch."""
    out = []
    for lane in range(self.lo // self.b, -(-self.hi // self.b)):
      a, z = max(self.lo, lane * self.b), min(self.hi, (lane + 1) * self.b)
      out += [(lane, e, w, local) for e, w, local in
              self.orders[lane].segments(step * self.b + a - lane * self.b, z - a)]
    return out

  def _issue(self, key):
    if key in self.windows:
      return
    order = self.orders[key[0]]
    # reader.result decodes a packed or sampled chunk into the NAMES arrays (data/cache.py)
    self.windows[key] = {int(c): self.reader.read_range(int(rows[0]), int(rows[-1]) + 1)
                         for c in order.window_chunks(*key[1:])
                         for rows in [order.chunk_rows(c)]}
    self.reads.update((key[1], c) for c in self.windows[key])

  def _chunks(self, key) -> list[dict[str, np.ndarray]]:
    """The window's decoded chunks in window order (each decoded once: the futures are
    replaced by their arrays)."""
    data = self.windows[key]
    if isinstance(data, dict):
      order = self.orders[key[0]]
      data = [self.reader.result(futs, order.chunk_rows(c)) for c, futs in data.items()]
      self.windows[key] = data
    return data

  def batch(self, step: int) -> dict[str, np.ndarray]:
    segments = self._segments(step)
    need = [s[:3] for s in segments]
    ahead = {s[:3] for t in range(step, step + self.prefetch + 1) for s in self._segments(t)}
    for key in sorted(ahead, key=lambda k: (k not in need, k)):
      self._issue(key)
    for key in [k for k in self.windows if k not in ahead]:
      del self.windows[key]  # no step from here on needs it
    out, pos = None, 0
    for *key, local in segments:
      chunks = self._chunks(tuple(key))
      starts = np.cumsum([0] + [len(c["tokens"]) for c in chunks])
      which = np.searchsorted(starts, local, side="right") - 1
      if out is None:
        out = {n: np.empty((self.hi - self.lo, *chunks[0][n].shape[1:]), chunks[0][n].dtype)
               for n in NAMES}
      for j in np.unique(which):  # copy only the rows this process needs, chunk by chunk
        at = np.flatnonzero(which == j)
        for n in NAMES:
          out[n][pos + at] = chunks[j][n][local[at] - starts[j]]
      pos += len(local)
    return out
