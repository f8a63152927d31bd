"""Teacher top-k logit cache in TensorStore (zarr3): layout, metadata and the reader.

At `path` (a directory or kvstore URL):
  tokens [n, L] int32, segment_ids [n, L] int32, topk_idx [n, L, k] int32,
  topk_logit [n, L, k] bf16 (teacher logits minus their row max, so topk_logit[..., 0] = 0),
  lse [n, L, s] f32 (full-vocab logsumexp of the same shifted logits / T, for each cached T),
  done [n_chunks] uint8 (the resume map), metadata.json.
p_i = exp(topk_logit_i / T - lse_T) is the teacher's exact probability at T.
That is the `plain` format (FORMAT). Two more (data/topk_codec.py has their layouts): `packed`
(PACKED_FORMAT: Rice-coded sorted ids, uint8 log-prob codes) and `sampled` (SAMPLED_FORMAT:
unique drawn ids and counts); the reader decodes both into the same tokens / segment_ids /
topk_idx / topk_logit / lse arrays a plain cache gives (`CacheReader.decode`).
Arrays are chunked along rows (`rows_per_chunk`); every chunk carries a crc32c checksum, so a
damaged chunk is detected on read and reported with its rows.
"""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import tensorstore as ts

from moedistill.errors import UserError, reason

FORMAT = "moedistill-topk-v2"  # v2: logits stored shifted by the row max
PACKED_FORMAT = "moedistill-topk-packed-v2"  # v2: value codes stored as the row's max - code
PACKED_FORMAT_V1 = "moedistill-topk-packed-v1"  # still read (data/topk_codec.py)
SAMPLED_FORMAT = "moedistill-sampled-v1"
KINDS = {FORMAT: "plain", PACKED_FORMAT: "packed", PACKED_FORMAT_V1: "packed",
         SAMPLED_FORMAT: "sampled"}
CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 * 2**20}})
# Data written or read once (the tokens phase): caching decoded chunks would only hold memory.
# A child of CONTEXT, so it shares the other resources (a memory:// store lives in one).
ONCE = ts.Context({"cache_pool": {"total_bytes_limit": 0}}, CONTEXT)
# May differ between an interrupted and a resumed run (teacher_runtime: the resolved MoE backend
# and device, which every exact backend may differ in without changing the cache's meaning).
IGNORED_FIELDS = ("complete", "stats", "teacher_runtime")


def kvstore_url(path: str) -> str:
  url = path if "://" in path else "file://" + os.path.abspath(path)
  return url.rstrip("/") + "/"


def kvstore_spec(path: str, sub: str = ""):
  """TensorStore kvstore for `sub` under a cache path: a local directory, a kvstore URL
  (gs://, s3://, memory://) or a kvstore JSON spec (an S3-compatible store needs its
  "endpoint" in the spec: a plain s3:// URL cannot carry it)."""
  if path.lstrip().startswith("{"):
    try:
      spec = json.loads(path)
    except json.JSONDecodeError as e:
      raise UserError(f"cache.path={path}: not a valid kvstore JSON spec ({e.msg})") from None
    base = str(spec.get("path", "")).strip("/")
    return {**spec, "path": (base + "/" if base else "") + sub}
  return kvstore_url(path) + sub


def join(path: str, *parts: str) -> str:
  """A cache path below `path` (a directory, URL or JSON spec), e.g. the split's."""
  if path.lstrip().startswith("{"):
    spec = kvstore_spec(path, "/".join(parts))
    return json.dumps(spec)
  if "://" in path:
    return "/".join([path.rstrip("/"), *parts])
  return os.path.join(path, *parts)


# Row chunks per `tokens_done` chunk and per shard file of `tokens` / `segment_ids`: each
# write is a file or an object whatever its size, and a 16-row chunk of tokens is only 64 KiB
# at seq 1024, so the tokens phase writes and marks that many row chunks at once (README
# "Measured", tokens phase). Reads still decode one row chunk. Process ranges are whole mark
# chunks, so no two processes write one shard.
TOKEN_MARKS_PER_CHUNK = 64
TOKEN_ARRAYS = ("tokens", "segment_ids")


def token_layout(rows: int, seq_len: int, rows_per_chunk: int):
  return {"tokens": (np.int32, (rows, seq_len)), "segment_ids": (np.int32, (rows, seq_len)),
          "tokens_done": (np.uint8, (-(-rows // rows_per_chunk),))}


def array_layout(meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  n, L, k, s = meta["rows"], meta["seq_len"], meta["k"], len(meta["temperatures"])
  kind = KINDS.get(meta.get("format"))
  if kind in ("packed", "sampled"):  # data/topk_codec.py; packed_ids: one field per row chunk
    out = {**token_layout(n, L, meta["rows_per_chunk"]), "rice_b": (np.uint8, (n, L)),
           "packed_ids": (np.uint8, (n_chunks(meta), meta["id_stream_bytes"]))}
    if kind == "packed":
      out.update(topk_code=(np.uint8, (n, L, k)), topk_top=(np.uint8, (n, L)),
                 lse=(np.float32, (n, L, s)))
    else:
      out["sample_count"] = (np.uint8, (n, L, meta["samples"]))
      if meta["exact_k"]:
        e = meta["exact_k"]
        out.update(topk_idx=(np.int32, (n, L, e)), topk_logit=(ml_dtypes.bfloat16, (n, L, e)),
                   lse=(np.float32, (n, L, 1)))
    return {**out, "done": (np.uint8, (n_chunks(meta),))}
  return {**token_layout(n, L, meta["rows_per_chunk"]),
          "topk_idx": (np.int32, (n, L, k)), "topk_logit": (ml_dtypes.bfloat16, (n, L, k)),
          "lse": (np.float32, (n, L, s)), "done": (np.uint8, (n_chunks(meta),))}


LOGIT_ARRAYS = ("topk_idx", "topk_logit", "lse", "done")
# Every format's: an --overwrite of a cache of another format deletes them all.
ALL_LOGIT_ARRAYS = (*LOGIT_ARRAYS, "rice_b", "packed_ids", "topk_code", "topk_top",
                    "sample_count")


def logit_arrays(meta: dict) -> tuple[str, ...]:
  """The arrays the logits phase writes for this cache's format."""
  return tuple(n for n in array_layout(meta) if n not in token_layout(1, 1, 1))


def n_chunks(meta) -> int:
  return -(-meta["rows"] // meta["rows_per_chunk"])


def _spec(path, name, dtype, shape, chunk0, codec):
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if codec == "zstd":
    codecs.append({"name": "zstd", "configuration": {"level": 3}})
  codecs.append({"name": "crc32c"})
  chunk = [chunk0, *shape[1:]]
  if name in TOKEN_ARRAYS:  # shards of TOKEN_MARKS_PER_CHUNK row chunks, see above
    codecs = [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": chunk, "codecs": codecs,
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                         {"name": "crc32c"}]}}]
    chunk = [chunk0 * TOKEN_MARKS_PER_CHUNK, *shape[1:]]
  return {"driver": "zarr3", "kvstore": kvstore_spec(path, name + "/"),
          "metadata": {"shape": list(shape), "data_type": np.dtype(dtype).name,
                       "chunk_grid": {"name": "regular", "configuration": {
                           "chunk_shape": chunk}},
                       "codecs": codecs}}


def open_arrays(path: str, meta: dict, create: bool = False, names=None,
                layout=None, context=None) -> dict[str, ts.TensorStore]:
  """The cache's arrays (`names` of them, default all); `layout` overrides `array_layout`."""
  out, futures = {}, {}
  for name, (dtype, shape) in (layout or array_layout(meta)).items():
    if names is not None and name not in names:
      continue
    chunk0 = {"done": 1, "tokens_done": TOKEN_MARKS_PER_CHUNK, "packed_ids": 1}.get(
        name, meta["rows_per_chunk"])
    spec = _spec(path, name, dtype, shape, chunk0, meta["codec"])
    if not create:
      spec = {"driver": "zarr3", "kvstore": spec["kvstore"]}
    futures[name] = ts.open(spec, create=create, context=context or CONTEXT)
  for name, f in futures.items():
    try:
      out[name] = f.result()
    except ValueError as e:
      raise UserError(f"cache.path={path}: cannot {'create' if create else 'open'} array "
                      f"{name} ({reason(e)})") from None
  return out


# Every top-level name moedistill writes at a split's cache path: nothing else is deleted.
OWN_NAMES = ("metadata.json", "tokens.json", "staging", "tokens", "segment_ids", "tokens_done",
             *ALL_LOGIT_ARRAYS, "repair")  # repair: data/cache_check.py's scratch store


def clear(path: str):
  """Deletes what moedistill wrote at `path` (OWN_NAMES only); a path holding anything else
  is refused with one line before anything is deleted, whatever --overwrite says."""
  kv = kvstore(path)
  for key in kv.list().result():
    top = key.decode(errors="replace").split("/")[0]
    if top not in OWN_NAMES:
      raise UserError(f"cache.path={path}: holds {key.decode(errors='replace')}, which "
                      "moedistill did not write; refusing to delete it (choose an empty or new "
                      "cache.path)")
  # The single keys go first: the file driver lists `name/` as a directory and fails on a
  # `name` that is still a file (metadata.json), so the two kinds of delete cannot overlap.
  for ranges in ([(name, name + "\0") for name in OWN_NAMES],
                 [(name + "/", name + "0") for name in OWN_NAMES]):
    for f in [kv.delete_range(ts.KvStore.KeyRange(*r)) for r in ranges]:
      f.result()


def kvstore(path: str) -> ts.KvStore:
  return ts.KvStore.open(kvstore_spec(path), context=CONTEXT).result()


def read_metadata(path: str, name: str = "metadata.json") -> dict | None:
  return metadata_result(path, name, lambda: kvstore(path).read(name).result())


def metadata_result(path: str, name: str, read) -> dict | None:
  """The JSON that `read()` (a kvstore read of `name`) gets, None when missing; errors in
  one line."""
  try:
    r = read()
  except ValueError as e:
    raise UserError(f"cache.path={path}: cannot read ({reason(e)})") from None
  if r.state != "value":
    return None
  try:
    return json.loads(r.value)
  except json.JSONDecodeError:
    raise UserError(f"cache {path}: {name} is corrupted (not valid JSON)") from None


def write_metadata(path: str, meta: dict, name: str = "metadata.json"):
  kvstore(path).write(name, json.dumps(meta, indent=2).encode()).result()


def bytes_per_token_on_disk(path: str, meta: dict) -> float | None:
  """Everything under a local cache directory (tokens, logit arrays, metadata) per cached
  token; None for a kvstore URL or spec (sizes would need a read of every object)."""
  if "://" in path or path.lstrip().startswith("{"):
    return None
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  return round(total / max(meta["rows"] * meta["seq_len"], 1), 2)


def first_difference(old: dict, new: dict, ignored=IGNORED_FIELDS) -> str | None:
  for key in list(new) + [k for k in old if k not in new]:  # the writer's field order
    if key not in ignored and old.get(key) != new.get(key):
      return key
  return None


def to_dense(topk_idx_lk, topk_logit_lk, lse_l, vocab_size: int, temperature: float):
  """Full-vocab teacher distribution [L, V] from a cached row at temperature T: the top-k
  probabilities exactly, the tail mass spread evenly over the other ids."""
  z = np.asarray(topk_logit_lk, np.float64) / temperature
  p_top = np.exp(z - np.asarray(lse_l, np.float64)[:, None])
  tail = np.clip(1.0 - p_top.sum(-1), 0.0, 1.0)
  k = topk_idx_lk.shape[-1]
  dense = np.repeat((tail / max(vocab_size - k, 1))[:, None], vocab_size, axis=1)
  np.put_along_axis(dense, np.asarray(topk_idx_lk), p_top, axis=1)
  return dense


class CacheReader:
  """Opens a complete cache for reading rows (training reads go through `loader.Loader`)."""

  def __init__(self, path: str):
    self.path = path
    meta = read_metadata(path)
    if meta is None:
      raise UserError(f"cache {path}: no metadata.json (run python -m moedistill.cache_logits)")
    if meta.get("format") not in KINDS:
      raise UserError(f"cache {path}: format={meta.get('format')!r}, expected one of "
                      f"{list(KINDS)}")
    if not meta.get("complete"):
      raise UserError(f"cache {path}: incomplete (a run was interrupted); rerun cache_logits "
                      "to finish it")
    self.meta = meta
    self.kind = KINDS[meta["format"]]  # plain | packed | sampled
    self.arrays = open_arrays(path, meta)
    self.rows = meta["rows"]

  def validate(self, *, vocab_size: int, seq_len: int, temperature: float | None = None,
               mode: str = "bucket", tokenizer_hash: str | None = None):
    m = self.meta
    checks = [(m["vocab_size"] == vocab_size, f"vocab_size={m['vocab_size']}, the student has "
               f"{vocab_size}"),
              (m["seq_len"] == seq_len, f"seq_len={m['seq_len']}, expected {seq_len}"),
              (tokenizer_hash is None or m["tokenizer_hash"] == tokenizer_hash,
               "tokenizer_hash differs from the configured tokenizer's")]
    if self.kind == "sampled" and temperature is not None:  # a loss at T reads it
      t = m["temperatures"][0]
      checks += [(mode not in ("bucket", "renormalize"), f"a sampled cache (format "
                  f"{m['format']}) cannot feed kd mode {mode}: its draws are not top-k "
                  "log-probs; use train.kd_mode=sampled or teacher_only"),
                 (temperature is None or abs(temperature - t) < 1e-9,
                  f"temperature={temperature}: the draws are unbiased only at the cache's "
                  f"temperature {t}")]
    elif mode == "sampled":
      checks.append((False, f"kd mode sampled needs a sampled cache; this one is "
                     f"{m['format']} (cache.mode=topk)"))
    if temperature is not None and mode == "bucket":
      checks.append((any(abs(t - temperature) < 1e-9 for t in m["temperatures"]),
                     f"temperature={temperature} is not cached (cached: {m['temperatures']}); "
                     "bucket mode needs the full-vocab logsumexp at that temperature"))
    for ok, msg in checks:
      if not ok:
        raise UserError(f"cache {self.path}: {msg}")

  def temperature_index(self, temperature: float) -> int | None:
    for i, t in enumerate(self.meta["temperatures"]):
      if abs(t - temperature) < 1e-9:
        return i
    return None

  def read_rows(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx, np.int64)
    names = ("tokens", "segment_ids", "topk_idx", "topk_logit", "lse")
    if self.kind == "plain":
      return self.result({n: self.arrays[n].oindex[idx].read() for n in names}, idx)
    # Other formats decode whole row chunks (an id stream is one per chunk).
    R = self.meta["rows_per_chunk"]
    chunks = np.unique(idx // R)
    futs = [self.read_range(c * R, min(c * R + R, self.rows)) for c in chunks]
    parts = [self.result(f, np.arange(c * R, min(c * R + R, self.rows)))
             for c, f in zip(chunks, futs)]
    where = np.searchsorted(chunks, idx // R)
    at = np.concatenate([[0], np.cumsum([len(p["tokens"]) for p in parts])])[where] + idx % R
    return {n: np.concatenate([p[n] for p in parts])[at] for n in names}

  def read_range(self, lo: int, hi: int) -> dict:
    """Async reads of rows [lo, hi) for `result`: any rows of a plain cache, one whole row
    chunk of the others (a chunk's ids are one stream)."""
    a = self.arrays
    if self.kind == "plain":
      return {n: a[n][lo:hi].read() for n in ("tokens", "segment_ids", "topk_idx",
                                                "topk_logit", "lse")}
    R = self.meta["rows_per_chunk"]
    if lo % R or hi != min(lo + R, self.rows):
      raise ValueError(f"read_range({lo}, {hi}): not one whole row chunk of {R} rows")
    return {n: (a[n][lo // R].read() if n == "packed_ids" else a[n][lo:hi].read())
            for n in logit_arrays(self.meta) + ("tokens", "segment_ids") if n != "done"}

  def decode(self, raw: dict) -> dict[str, np.ndarray]:
    """One row chunk's stored arrays -> tokens, segment_ids, topk_idx, topk_logit, lse."""
    from moedistill.data import topk_codec
    if self.kind == "plain":
      return raw
    m = self.meta
    rows, L = raw["rice_b"].shape
    P = rows * L
    shape = lambda x: x.reshape(rows, L, -1)  # noqa: E731
    if self.kind == "packed":
      idx, logit, lse = topk_codec.decode_topk(
          raw["packed_ids"], raw["rice_b"].ravel(), raw["topk_code"].reshape(P, -1),
          raw["topk_top"].ravel(), raw["lse"].reshape(P, -1),
          from_max=m["format"] != PACKED_FORMAT_V1)
    else:
      counts = raw["sample_count"].reshape(P, -1)
      ids = topk_codec.unpack_ids(raw["packed_ids"], raw["rice_b"].ravel(),
                                  (counts > 0).sum(1), counts.shape[1])
      e = m["exact_k"]
      ex = ((raw["topk_idx"].reshape(P, e), raw["topk_logit"].reshape(P, e),
             raw["lse"].reshape(P)) if e else (None, None, None))
      idx, logit, lse = topk_codec.sampled_targets(ids, counts, m["temperatures"][0], *ex)
    return {"tokens": raw["tokens"], "segment_ids": raw["segment_ids"],
            "topk_idx": shape(idx), "topk_logit": shape(logit), "lse": shape(lse)}

  def result(self, futures: dict, idx) -> dict[str, np.ndarray]:
    """Waits for reads of rows `idx`; a damaged chunk is reported with its rows."""
    out = {}
    for n, f in futures.items():
      try:
        out[n] = f.result()
      except ValueError as e:
        r = self.meta["rows_per_chunk"]
        bad = sorted({int(i) // r for i in idx})
        raise UserError(f"cache {self.path}: array {n} is damaged in a chunk among rows "
                        f"{[(c * r, c * r + r - 1) for c in bad][:4]} "
                        f"({reason(e)}); run python -m moedistill.cache_logits --config=... "
                        "--repair to recompute the damaged chunks (--verify lists them)") from None
    return self.decode(out) if self.kind != "plain" and "rice_b" in out else out
