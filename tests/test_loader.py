"""Chunk-order training reads: the order matches a plain reference, batches equal random-row
reads of the same rows, a loader started at step s (a resume) reads exactly what an
uninterrupted one reads, and no chunk is read twice in an epoch."""
import numpy as np
import pytest

from moedistill.data import cache
from moedistill.data.loader import Loader, Order

ROWS, L, K, R = 45, 6, 3, 4  # 12 chunks, the last one partial


def reference_epoch(rows, R, W, seed, e):
  """The epoch's row sequence spelled out: chunk permutation, windows of W chunks, each
  window's rows permuted."""
  n_chunks = -(-rows // R)
  perm = np.random.default_rng([seed, e]).permutation(n_chunks)
  out = []
  for w in range(0, n_chunks, W):
    window_rows = [r for c in perm[w:w + W] for r in range(c * R, min(c * R + R, rows))]
    shuffle = np.random.default_rng([seed, e, w // W]).permutation(len(window_rows))
    out += [window_rows[i] for i in shuffle]
  return np.asarray(out)


@pytest.mark.parametrize("window", [1, 3, 5, 100])
def test_order_matches_reference(window):
  order = Order(ROWS, R, window, seed=7)
  ref = np.concatenate([reference_epoch(ROWS, R, window, 7, e) for e in range(3)])
  for e in range(3):
    assert sorted(ref[e * ROWS:(e + 1) * ROWS]) == list(range(ROWS))
  for start, count in [(0, ROWS), (3, 10), (40, 20), (44, 1), (0, 3 * ROWS)]:
    np.testing.assert_array_equal(order.global_indices(start, count), ref[start:start + count])
  assert not np.array_equal(ref[:ROWS], ref[ROWS:2 * ROWS])


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
  """A complete cache of random arrays (no teacher needed to test reads)."""
  path = str(tmp_path_factory.mktemp("c") / "train")
  meta = {"format": cache.FORMAT, "rows": ROWS, "seq_len": L, "k": K, "temperatures": [1.0, 2.0],
          "rows_per_chunk": R, "codec": "zstd", "complete": True}
  arrays = cache.open_arrays(path, meta, create=True)
  r = np.random.default_rng(0)
  for name, (dtype, shape) in cache.array_layout(meta).items():
    arrays[name].write(r.integers(0, 1000, shape).astype(dtype)).result()
  cache.write_metadata(path, meta)
  return cache.CacheReader(path)


def test_batches_equal_row_reads_and_resume(reader):
  B, seed, n_steps = 8, 3, 20  # 160 rows: three and a half epochs
  full = Loader(reader, B, seed, window=3, prefetch=2)
  batches = [full.batch(s) for s in range(n_steps)]
  order = Order(ROWS, R, 3, seed)
  for s in (0, 5, 11, 19):
    ref = reader.read_rows(order.global_indices(s * B, B))  # plain random-row reads
    for name in ref:
      np.testing.assert_array_equal(batches[s][name], ref[name], err_msg=f"{name} step {s}")
  for start in (1, 7, 13):  # a resumed run knows only the step
    resumed = Loader(reader, B, seed, window=3, prefetch=2)
    for s in range(start, n_steps):
      got = resumed.batch(s)
      for name in got:
        np.testing.assert_array_equal(got[name], batches[s][name])
  n_chunks = -(-ROWS // R)
  assert max(full.reads.values()) == 1  # no chunk decoded twice in an epoch
  assert sorted(c for e, c in full.reads if e in (0, 1, 2)) == sorted(list(range(n_chunks)) * 3)


def test_process_slices_tile_the_global_batch(reader):
  one = Loader(reader, 8, 1, window=2)
  two = [Loader(reader, 8, 1, p, 2, window=2) for p in range(2)]
  for s in range(12):
    whole = one.batch(s)
    halves = [t.batch(s) for t in two]
    for name in whole:
      np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), whole[name])
