"""Dense encodings of a cache's teacher entries, host-side, vectorised NumPy.

Two layouts besides today's `plain` (int32 ids, bf16 logits; see data/cache.py):

`packed` top-k (cache.format=packed), per position of k entries:
  ids     sorted ascending and Rice-coded as gaps (g_0 = id_0, g_j = id_j - id_{j-1} - 1) with
          a per-position parameter b (`rice_b`, uint8: of the 5 values within 2 of
          floor(log2(mean gap)), the one giving the fewest bits). The quotients g >> b go, in unary (q zeros then a one), into one bit stream per
          row chunk, after a 4-byte header (the unary part's bytes),
          followed (byte-aligned) by the b low bits of every gap (grouped by b). The stream lies
          left-aligned in a fixed-size per-chunk field (`packed_ids`, [n_chunks, cap] uint8) of
          its worst case (`stream_cap`); zstd (required) reduces the zero padding to a few
          bytes, so the bytes on disk are the stream's own.
  values  code = round(d / STEP) clipped to 255, d = max - logit >= 0 (logits at T = 1,
          relative to the row max), stored as `topk_code` = the position's largest code minus
          the code (uint8, in the sorted-id order; the argmax's code is 0, so its stored value
          is that largest code and the decoder needs nothing else). A top-k's entries crowd
          towards its smallest one (the k-th), so these differences are small numbers whose
          spread follows the row's, and zstd stores them in fewer bits than the codes
          themselves (figures: docs/cache_format.md). The first packed format
          (PACKED_FORMAT_V1, still read) stored the codes.
  top     position of the row's argmax in the sorted ids (`topk_top`, uint8), so a decoded row
          starts with the teacher's exact argmax whatever the ties among rounded codes.
  lse     f32 per cached T, `lse_T + log(M^_T / M_T)`: M_T the exact top-k mass at T (from the
          forward's f32 logits), M^_T the decoded entries' mass under the exact lse_T. With it
          the decoded top-k mass equals M_T exactly, hence so does the tail bucket.
Decoded distribution at T (what `cache.to_dense` and the bucket loss read): top-k entries
p^_i = exp(-code_i STEP / T - lse'_T), the tail 1 - sum p^_i spread evenly over the other ids,
exactly as for a plain cache. Its added KL to the exact teacher: the tail (its mass and the
way it is spread) is the same as for an exact top-k, so KL(exact || decoded) - KL(exact ||
exact top-k + even tail) = M_T KL(p_top / M_T || p^_top / M_T), and with every log-ratio
within STEP / (2T) of a common offset Hoeffding's lemma bounds that by STEP^2 / (8 T^2)
(1/12 nats: 8.7e-4 at T = 1). Clipped codes (d > 255 STEP = 21.25 nats, p < 6e-10 of the top)
add at most their own mass.

`sampled` (cache.mode=sampled): per position N ids drawn with replacement from the teacher at
the cache's temperature (after `exact_k` exact top ids, from the rest of the distribution),
kept as unique ids (Rice-coded as above, `packed_ids` / `rice_b`) and counts (`sample_count`,
uint8, in the sorted-id order; 0 pads). Decoded (`sampled_targets`) into the loss's arrays:
ids, `topk_logit = T log w` and lse = 0, w the unbiased target weights (see there).
"""
from __future__ import annotations

import numpy as np

STEP = 1.0 / 12.0  # nats per value code: added KL <= STEP^2 / (8 T^2)
MAX_CODE = 255
MAX_B = 24  # Rice parameters tried (ids < 2^24 + gaps: any vocabulary up to 16.7M)
PAD_LOGIT = -1e30  # decoded padding (weight 0): exp() is exactly 0 at any temperature


# ---------------------------------------------------------------- ids: Rice-coded gaps

def stream_cap(positions: int, k: int, vocab: int) -> int:
  """Bytes that hold any chunk's stream of `positions` x at most k ids < vocab. A position of
  n ids with mean gap m <= vocab / n - 1 costs at the chosen b at most what b0 =
  floor(log2(max(m, 1))) costs (b0 is a candidate): n (b0 + 1) unary ones and remainder bits
  plus sum_j (g_j >> b0) <= n m / 2^b0 < 2n unary zeros, so < n (log2(vocab / n) + 3) bits,
  which grows with n (n <= vocab / 2): at most k (log2(vocab / k) + 3). Plus two byte
  alignments and the 4-byte header."""
  per = k * (np.log2(max(vocab / max(k, 1), 1.0)) + 3)
  return int(np.ceil(positions * per / 8)) + 2 + 4


def pack_ids(ids_pk, n_p):
  """ids_pk [P, K] ascending in their first n_p[p] slots (the rest ignored) -> (stream uint8,
  rice_b [P] uint8)."""
  ids_pk = np.asarray(ids_pk, np.int64)
  P, K = ids_pk.shape
  n_p = np.asarray(n_p, np.int64)
  valid = np.arange(K)[None, :] < n_p[:, None]
  prev = np.concatenate([np.full((P, 1), -1, np.int64), ids_pk[:, :-1]], axis=1)
  gaps = np.where(valid, ids_pk - prev - 1, 0)
  if np.any(gaps < 0):
    raise ValueError("pack_ids: ids are not strictly ascending within a position")
  # The best b is within 2 of floor(log2(mean gap)) (a Rice code's cost is convex in b and
  # its optimum is near log2(mean gap ln 2)): try those 5 (cheaper than all of 0..MAX_B).
  mean = gaps.sum(1) / np.maximum(n_p, 1)
  b0 = np.floor(np.log2(np.maximum(mean, 1.0))).astype(np.int64)
  bs = np.clip(b0[None, :] + np.arange(-2, 3)[:, None], 0, MAX_B)  # [5, P]
  cost = (gaps[None] >> bs[:, :, None]).sum(-1) + n_p[None] * (bs + 1)
  b_p = np.take_along_axis(bs, np.argmin(cost, axis=0)[None], 0)[0].astype(np.uint8)
  g = gaps[valid]
  b_e = np.repeat(b_p.astype(np.int64), n_p)
  q = g >> b_e
  unary = np.zeros(int((q + 1).sum()), np.uint8)
  unary[np.cumsum(q + 1) - 1] = 1
  # Remainders grouped by b (ascending), entry order within a group, each b bits most
  # significant first: a group is one [entries, b] bit matrix (the decoder knows every b).
  bits32 = np.unpackbits((g & ((1 << b_e) - 1)).astype(">u4").view(np.uint8).reshape(-1, 4),
                         axis=1)
  rem = [bits32[b_e == b, 32 - b:].ravel() for b in np.unique(b_e) if b]
  rem = np.concatenate(rem) if rem else np.zeros(0, np.uint8)
  unary = np.packbits(unary)
  head = np.asarray([len(unary)], "<u4").view(np.uint8)
  return np.concatenate([head, unary, np.packbits(rem)]), b_p


def unpack_ids(stream, b_p, n_p, K: int):
  """Inverse of pack_ids: ids [P, K] int32, slots past n_p[p] are 0."""
  b_p, n_p = np.asarray(b_p, np.int64), np.asarray(n_p, np.int64)
  P, E = len(n_p), int(n_p.sum())
  out = np.zeros((P, K), np.int32)
  if E == 0:
    return out
  stream = np.asarray(stream, np.uint8)
  u = int(stream[:4].view("<u4")[0])
  ones = np.flatnonzero(np.unpackbits(stream[4:4 + u]))  # each of the E ones ends a code
  if len(ones) != E:
    raise ValueError(f"unpack_ids: {len(ones)} unary codes in the id stream, expected {E}")
  q = np.diff(ones, prepend=-1) - 1
  bits = np.unpackbits(stream[4 + u:])
  start = 0
  b_e = np.repeat(b_p, n_p)
  r = np.zeros(E, np.int64)
  for b in np.unique(b_e):  # the remainder groups, as pack_ids lays them out
    if b:
      sel = b_e == b
      m = int(sel.sum())
      full = np.zeros((m, 32), np.uint8)
      full[:, 32 - b:] = bits[start:start + m * b].reshape(m, b)
      r[sel] = np.packbits(full, axis=1).view(">u4").ravel()
      start += m * b
  steps = ((q << b_e) | r) + 1
  cs = np.cumsum(steps)
  row_start = np.repeat(np.concatenate([[0], np.cumsum(n_p)[:-1]]), n_p)
  before = np.where(row_start > 0, cs[np.maximum(row_start - 1, 0)], 0)
  valid = np.arange(K)[None, :] < n_p[:, None]
  out[valid] = cs - before - 1
  return out


def put_stream(stream, cap: int) -> np.ndarray:
  """The stream left-aligned in its fixed-size field (zero padding)."""
  if len(stream) > cap:
    raise ValueError(f"id stream of {len(stream)} bytes exceeds its bound of {cap}")
  out = np.zeros(cap, np.uint8)
  out[:len(stream)] = stream
  return out


# ---------------------------------------------------------------- packed top-k

def encode_topk(idx_pk, logit_pk, lse_ps, temperatures):
  """One chunk's top-k (positions flattened: idx [P, k], f32 logits relative to the row max,
  argmax first; exact lse [P, s]) -> (stream, {rice_b [P], topk_code [P, k] (each the
  position's largest code minus the entry's), topk_top [P], lse [P, s]})."""
  idx = np.asarray(idx_pk, np.int64)
  d = -np.asarray(logit_pk, np.float64)  # >= 0, d[:, 0] = 0 (argmax first)
  order = np.argsort(idx, axis=1, kind="stable")
  ids = np.take_along_axis(idx, order, axis=1)
  code = np.clip(np.rint(np.take_along_axis(d, order, axis=1) / STEP), 0, MAX_CODE)
  top = np.argmax(order == 0, axis=1)  # where the argmax went
  stream, b_p = pack_ids(ids, np.full(len(ids), ids.shape[1]))
  temps = np.asarray(temperatures, np.float64)
  lse = np.asarray(lse_ps, np.float64)
  # log M_T (exact entries) and log M^_T (decoded entries), both under the exact lse_T
  log_m = _logsumexp(-d[:, None, :] / temps[None, :, None], -1) - lse
  log_m_hat = _logsumexp(-code[:, None, :] * STEP / temps[None, :, None], -1) - lse
  stored = code.max(axis=1, keepdims=True) - code  # the argmax (code 0) holds the max
  return stream, {"rice_b": b_p, "topk_code": stored.astype(np.uint8),
                  "topk_top": top.astype(np.uint8),
                  "lse": (lse + log_m_hat - log_m).astype(np.float32)}


def decode_topk(stream, rice_b, topk_code, topk_top, lse, from_max: bool = True):
  """-> (topk_idx [P, k] int32, topk_logit [P, k] f32, lse [P, s] f32) as a plain cache
  gives them: logits relative to the max, the argmax first, then by decoded value
  (descending; ties by id), so the first k' entries are a top-k' of the decoded row.
  from_max=False reads PACKED_FORMAT_V1's `topk_code` (the codes themselves)."""
  code = np.asarray(topk_code).astype(np.int32)
  P, k = code.shape
  top = (np.arange(P), np.asarray(topk_top, np.int64))  # each position's argmax entry
  if from_max:  # stored = max - code, and the argmax's stored value is the max
    code = code[top][:, None] - code
  ids = unpack_ids(stream, rice_b, np.full(P, k), k)
  key = code.copy()
  key[top] = -1  # the argmax sorts first
  order = np.argsort(key, axis=1, kind="stable")  # ids ascending within equal codes
  return (np.take_along_axis(ids, order, axis=1),
          (-STEP * np.take_along_axis(code, order, axis=1)).astype(np.float32),
          np.asarray(lse, np.float32))


def _logsumexp(x, axis):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


# ---------------------------------------------------------------- sampled

def unique_counts(ids_pn):
  """N draws per position [P, N] -> (unique ids ascending [P, N] int64, counts [P, N]
  uint8 with 0 past the unique ones, n unique [P])."""
  s = np.sort(np.asarray(ids_pn, np.int64), axis=1)
  P, N = s.shape
  new = np.ones_like(s, bool)
  new[:, 1:] = s[:, 1:] != s[:, :-1]
  slot = np.cumsum(new, axis=1) - 1
  uniq = np.zeros((P, N), np.int64)
  uniq[np.nonzero(new)[0], slot[new]] = s[new]
  counts = np.zeros((P, N), np.int64)
  np.add.at(counts, (np.repeat(np.arange(P), N), slot.ravel()), 1)
  return uniq, counts.astype(np.uint8), new.sum(1)


def encode_sampled(ids_pn):
  uniq, counts, n = unique_counts(ids_pn)
  stream, b_p = pack_ids(uniq, n)
  return stream, {"rice_b": b_p, "sample_count": counts}


def sampled_weights(exact_logit_pe, lse_p, counts_pn, temperature: float):
  """Target weights ([P, E] for the exact ids, [P, N] for the sampled ones) whose
  expectation is the teacher's distribution p at T, id by id:
    exact top ids j:  w_j = p_j = exp(logit_j / T - lse) (exact up to the bf16 rounding of
                      the stored logits, as in a plain cache);
    sampled ids i:    w_i = R c_i / N, R = 1 - sum_j p_j the rest's mass and c_i the count
                      of i among N draws from p restricted to the rest (p_i / R): E[c_i] =
                      N p_i / R, so E[w_i] = p_i.
  They sum to 1 (sum c_i = N). Hence E[w] = p, and the loss -sum_i w_i log q_i (q the
  student at T) has E[grad] = (q - E[w]) / T = (q - p) / T, the full-vocab KD gradient."""
  counts = np.asarray(counts_pn, np.float64)
  N = counts.shape[1]
  if exact_logit_pe is None or exact_logit_pe.shape[1] == 0:
    return np.zeros((len(counts), 0)), counts / N
  p_e = np.exp(np.asarray(exact_logit_pe, np.float64) / temperature
               - np.asarray(lse_p, np.float64)[:, None])
  rest = np.clip(1.0 - p_e.sum(1), 0.0, 1.0)
  return p_e, rest[:, None] * counts / N


def sampled_targets(ids_pn, counts_pn, temperature: float, exact_idx_pe=None,
                    exact_logit_pe=None, lse_p=None):
  """-> (topk_idx [P, E + N] int32, topk_logit [P, E + N] f32, lse [P, 1] f32) for the
  loss: logit = T log w (PAD_LOGIT where w = 0) and lse 0, so the loss's teacher
  probabilities exp(logit / T - lse) are w. Order: exact ids first (as cached, argmax
  first), then sampled ids by count (descending; ties by id)."""
  counts = np.asarray(counts_pn)
  w_e, w_s = sampled_weights(exact_logit_pe, lse_p, counts, temperature)
  order = np.argsort(-counts.astype(np.int64), axis=1, kind="stable")
  ids = np.take_along_axis(np.asarray(ids_pn, np.int64), order, axis=1)
  w = np.concatenate([w_e, np.take_along_axis(w_s, order, axis=1)], axis=1)
  if exact_idx_pe is not None:
    ids = np.concatenate([np.asarray(exact_idx_pe, np.int64), ids], axis=1)
  with np.errstate(divide="ignore"):
    logit = np.where(w > 0, temperature * np.log(np.maximum(w, 1e-300)), PAD_LOGIT)
  return (ids.astype(np.int32), logit.astype(np.float32),
          np.zeros((len(ids), 1), np.float32))
