"""Where a tokens-phase piece's rows go, and the records that say so.

A piece whose row offset is known (every earlier piece recorded) is written straight into
the final arrays (`Direct`); the others are staged as `staging/<g>/<part>` (`Staged`) and
copied in by the assembly pass, which reads rows back by global range (`PieceRows`).
`staging/<g>.json` (row count, stats, and `at` or `parts`), written last, marks a piece done;
`Records` reads them once each and gives row offsets as prefix sums.
"""
from __future__ import annotations

import numpy as np
import tensorstore as ts

from moedistill.data import cache

STAGING = "staging/"


def record_name(g: int) -> str:
  return f"{STAGING}{g:08d}.json"


def part_key(g: int, j: int) -> str:
  return f"{STAGING}{g:08d}/{j:05d}/"


def _part_spec(path, g: int, j: int, shape):
  return {"driver": "zarr3", "kvstore": cache.kvstore_spec(path, part_key(g, j)),
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


def wait_all(futures):
  for f in futures:
    f.result()


class Records:
  """The pieces' records, read once each; row offsets as prefix sums."""

  def __init__(self, path):
    self.path, self.known, self.sums = path, {}, [0]  # sums[i]: rows of pieces 0..i-1

  def get(self, g: int) -> dict | None:
    if g not in self.known:
      r = cache.read_metadata(self.path, record_name(g))
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


class PieceRows:
  """Rows by global row range: staged parts (the last decoded one kept) or, for pieces
  written directly, the final arrays."""

  def __init__(self, path, records, arrays):
    self.path, self.records, self.arrays, self.last = path, records, arrays, (None, None)
    self.offsets = np.concatenate([[0], np.cumsum([r["rows"] for r in records])]).astype(
        np.int64)

  def _part(self, g, j):
    if self.last[0] != (g, j):
      arr = ts.open({"driver": "zarr3", "kvstore": cache.kvstore_spec(
          self.path, part_key(g, j))}, context=cache.ONCE).result()
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
