"""The packed top-k codec (data/topk_codec.py) on synthetic rows: ids round-trip through the
Rice-coded stream, values within half a step of the exact ones, the argmax first, and the
first packed format's stored codes (PACKED_FORMAT_V1) still decode to the same rows."""
import numpy as np
import pytest

from moedistill.data import topk_codec as C


def _rows(P=300, V=5000, k=16, seed=0):
  r = np.random.default_rng(seed)
  z = r.normal(0, 1, (P, V)) * r.uniform(0.5, 4.0, (P, 1))  # flat and peaked rows
  idx = np.argsort(-z, axis=1)[:, :k]
  top = np.take_along_axis(z, idx, 1)
  logit = top - top[:, :1]
  m = z.max(1, keepdims=True)
  lse = np.stack([np.log(np.exp((z - m) / T).sum(1)) for T in (1.0, 2.0)], 1)
  return idx, logit, lse


def test_ids_round_trip_any_count():
  r = np.random.default_rng(1)
  V, K, P = 100_000, 12, 200
  n = r.integers(0, K + 1, P)
  ids = np.zeros((P, K), np.int64)
  for p in range(P):
    ids[p, :n[p]] = np.sort(r.choice(V, n[p], replace=False))
  stream, b = C.pack_ids(ids, n)
  assert len(stream) <= C.stream_cap(P, K, V)
  got = C.unpack_ids(stream, b, n, K)
  np.testing.assert_array_equal(got, np.where(np.arange(K) < n[:, None], ids, 0))


def test_packed_rows_decode_exactly_within_half_a_step():
  idx, logit, lse = _rows()
  stream, a = C.encode_topk(idx, logit, lse, [1.0, 2.0])
  ids, val, lse_d = C.decode_topk(stream, a["rice_b"], a["topk_code"], a["topk_top"], a["lse"])
  np.testing.assert_array_equal(ids[:, 0], idx[:, 0])  # the exact argmax first
  np.testing.assert_array_equal(np.sort(ids, 1), np.sort(idx, 1))
  exact = np.take_along_axis(logit, np.argsort(idx, 1), 1)  # both in sorted-id order
  dec = np.take_along_axis(val, np.argsort(ids, 1), 1)
  assert np.abs(dec - exact).max() <= C.STEP / 2 + 1e-6
  assert np.all(np.diff(val, axis=1) <= 0) and np.all(val[:, 0] == 0)
  # lse' makes the decoded top-k mass at each T equal the exact one
  for j, T in enumerate((1.0, 2.0)):
    m_exact = np.exp(logit / T - lse[:, j:j + 1]).sum(1)
    m_dec = np.exp(val / T - lse_d[:, j:j + 1]).sum(1)
    np.testing.assert_allclose(m_dec, m_exact, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_first_packed_format_still_decodes(seed):
  """V1 stored the codes themselves; the same rows stored either way decode alike."""
  idx, logit, lse = _rows(seed=seed)
  stream, a = C.encode_topk(idx, logit, lse, [1.0, 2.0])
  stored = a["topk_code"].astype(np.int64)
  top = a["topk_top"].astype(np.int64)
  assert np.all(stored[np.arange(len(top)), top] == stored.max(1))  # the argmax holds the max
  v1_codes = (stored.max(1, keepdims=True) - stored).astype(np.uint8)
  new = C.decode_topk(stream, a["rice_b"], a["topk_code"], a["topk_top"], a["lse"])
  old = C.decode_topk(stream, a["rice_b"], v1_codes, a["topk_top"], a["lse"], from_max=False)
  for x, y in zip(new, old):
    np.testing.assert_array_equal(x, y)
