"""Chunk-order training reads: the order matches a plain reference, batches equal random-row
reads of the same rows, a loader started at step s (a resume) reads exactly what an
uninterrupted one reads, and no chunk is read twice in an epoch."""
import numpy as np
import pytest

from moedistill.data import cache
from moedistill.data.loader import Loader, Order
from moedistill.errors import UserError

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


def reference_lane(rows, R, W, seed, lanes, lane, epochs):
  """A lane's row sequence spelled out: its chunks (c % lanes == lane) permuted per epoch,
  windows of W chunks, each window's rows permuted."""
  chunks = [c for c in range(-(-rows // R)) if c % lanes == lane]
  out = []
  for e in range(epochs):
    perm = [chunks[i] for i in np.random.default_rng([seed, lanes, lane, e]).permutation(
        len(chunks))]
    for w in range(0, len(perm), W):
      window_rows = [r for c in perm[w:w + W] for r in range(c * R, min(c * R + R, rows))]
      shuffle = np.random.default_rng([seed, lanes, lane, e, w // W]).permutation(
          len(window_rows))
      out += [window_rows[i] for i in shuffle]
  return np.asarray(out)


def test_lanes_order_matches_reference_and_the_batch_is_the_same_for_any_process_count(
    reader):
  """3 lanes: the global batch is the lanes' sequences side by side, the same for 1, 2, 3
  and 6 processes (2 cuts a lane in two), and it resumes at any step."""
  B, seed, lanes, n_steps = 6, 5, 3, 16
  refs = [reference_lane(ROWS, R, 2, seed, lanes, i, 7) for i in range(lanes)]
  one = Loader(reader, B, seed, window=2, prefetch=2, lanes=lanes)
  for s in range(n_steps):
    rows = np.concatenate([ref[s * 2:(s + 1) * 2] for ref in refs])
    whole = one.batch(s)
    expect = reader.read_rows(rows)
    for name in whole:
      np.testing.assert_array_equal(whole[name], expect[name], err_msg=f"{name} step {s}")
    for P in (2, 3, 6):
      parts = [Loader(reader, B, seed, p, P, window=2, lanes=lanes).batch(s) for p in range(P)]
      for name in whole:
        np.testing.assert_array_equal(np.concatenate([x[name] for x in parts]), whole[name])


def test_each_process_decodes_only_its_lanes_chunks(reader):
  """One lane per process: the two processes' reads are disjoint chunk sets that cover the
  cache, each chunk once per epoch; one lane shared by two processes reads every chunk in
  both."""
  n_chunks = -(-ROWS // R)
  two = [Loader(reader, 8, 2, p, 2, window=2, prefetch=1, lanes=2) for p in range(2)]
  for s in range(10):  # 80 rows: both lanes finish their first epoch (~22 rows each)
    for t in two:
      t.batch(s)
  first = [{c for e, c in t.reads if e == 0} for t in two]
  assert first[0] == set(range(0, n_chunks, 2)) and first[1] == set(range(1, n_chunks, 2))
  assert max(max(t.reads.values()) for t in two) == 1
  shared = [Loader(reader, 8, 2, p, 2, window=2, prefetch=1) for p in range(2)]
  for s in range(6):
    for t in shared:
      t.batch(s)
  assert all({c for e, c in t.reads if e == 0} == set(range(n_chunks)) for t in shared)


def test_lanes_refused_in_one_line(reader):
  with pytest.raises(UserError, match="not divisible by cache.read_lanes=4"):
    Loader(reader, 6, 0, lanes=4)
  with pytest.raises(UserError, match="16 read lanes .* more than the cache's 12 row chunks"):
    Loader(reader, 16, 0, lanes=16)


def test_run_lanes_come_from_the_config_then_the_checkpoints_then_the_process_count():
  from moedistill.training.trainer import read_lanes
  assert read_lanes(0, None, 4) == 4   # a fresh run on 4 processes
  assert read_lanes(0, 4, 2) == 4      # resumed on 2: the batches stay those of 4 lanes
  assert read_lanes(0, 1, 8) == 1      # checkpoints from before lanes: one lane
  assert read_lanes(3, 4, 2) == 3      # the config decides (the order changes, said once)
