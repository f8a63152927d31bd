"""Datasets -> packed token rows, deterministic and fingerprinted.

Documents (a `datasets` hub name, or local json/jsonl/parquet/txt files) are tokenized without
special tokens, each followed by EOS, concatenated and cut into rows of `seq_len`. Segment ids
(1, 2, ... per row; 0 = padding in the last row) keep packed documents apart in attention, so
teacher and student see identical rows. Position t is trained to predict token t+1 only
inside one segment (`train_step.labels_and_mask`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from moedistill.errors import ConfigError

PACKING_VERSION = "concat-eos-v1"
EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  source: tuple[str, ...]   # local files/globs, or one hub dataset name
  tokenizer: str            # local tokenizer directory (AutoTokenizer)
  seq_len: int
  text_field: str = "text"
  hub_config: str | None = None
  split: str = "train"
  max_rows: int = 0         # 0: all rows

  def __post_init__(self):
    if self.seq_len < 2:
      raise ConfigError(f"data.seq_len={self.seq_len}: expected >= 2")


@dataclasses.dataclass(frozen=True)
class Rows:
  tokens: np.ndarray        # [n, seq_len] int32
  segment_ids: np.ndarray   # [n, seq_len] int32
  fingerprint: str
  tokenizer_hash: str
  vocab_size: int           # the tokenizer's


def _local_files(source) -> list[str] | None:
  files = []
  for s in source:
    hits = sorted(glob.glob(s))
    if not hits:
      if len(source) == 1 and not os.path.splitext(s)[1] and "/" in s and not os.path.exists(s):
        return None  # looks like a hub name ("org/dataset")
      raise ConfigError(f"data.source: {s} matches no file")
    files += hits
  for f in files:
    if os.path.splitext(f)[1] not in EXTENSIONS:
      raise ConfigError(f"data.source: {f} has an unknown extension, expected one of "
                        f"{sorted(EXTENSIONS)}")
  return files


def _sha(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def _read_local(files: list[str], kind: str, field: str) -> list[str]:
  """Local files read directly (no datasets cache written under ~/.cache)."""
  out = []
  for f in files:
    if kind == "text":
      if field != "text":
        raise ConfigError(f"data.text_field={field!r}: .txt files only have 'text'")
      out += Path(f).read_text().splitlines()
      continue
    if kind == "parquet":
      import pyarrow.parquet as pq
      table = pq.read_table(f)
      if field not in table.column_names:
        raise ConfigError(f"data.text_field={field!r} not in {f}; columns are "
                          f"{table.column_names}")
      out += table.column(field).to_pylist()
      continue
    text = Path(f).read_text()
    try:
      records = (json.loads(text) if f.endswith(".json") and text.lstrip().startswith("[")
                 else [json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError as e:
      raise ConfigError(f"data.source: {f} is not valid JSON/JSONL ({e.msg}, line "
                        f"{e.lineno})") from None
    for i, r in enumerate(records):
      if not isinstance(r, dict) or field not in r:
        raise ConfigError(f"data.text_field={field!r} not in record {i} of {f}"
                          + (f"; keys are {sorted(r)}" if isinstance(r, dict) else ""))
      out.append(r[field])
  return out


def load_texts(spec: DataSpec) -> tuple[list[str], str]:
  """Returns (documents, source fingerprint)."""
  files = _local_files(spec.source)
  if files is None:
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    ds = datasets.load_dataset(spec.source[0], spec.hub_config, split=spec.split)
    if spec.text_field not in ds.column_names:
      raise ConfigError(f"data.text_field={spec.text_field!r} not in the dataset; columns are "
                        f"{ds.column_names}")
    return [t for t in ds[spec.text_field] if t], _sha("hub", spec.source[0], spec.hub_config,
                                                        spec.split, ds._fingerprint)
  kind = EXTENSIONS[os.path.splitext(files[0])[1]]
  if any(EXTENSIONS[os.path.splitext(f)[1]] != kind for f in files):
    raise ConfigError(f"data.source: mixes file types {files}; expected one type")
  fp = _sha("files", *[_sha(Path(f).read_bytes()) for f in files])  # content, not location
  return [t for t in _read_local(files, kind, spec.text_field) if t], fp


def tokenizer_hash(path) -> str:
  files = sorted(p for p in Path(path).iterdir()
                 if p.is_file() and ("token" in p.name or p.name in ("vocab.json", "merges.txt")))
  return _sha(*[_sha(p.name, p.read_bytes()) for p in files])


def load_tokenizer(path):
  from transformers import AutoTokenizer
  if not Path(path, "tokenizer_config.json").exists() and not Path(path, "tokenizer.json").exists():
    raise ConfigError(f"data.tokenizer={path}: no tokenizer files there (expected a local "
                      "directory with tokenizer.json / tokenizer_config.json)")
  try:
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
  except ValueError as e:  # e.g. custom code: never run (trust_remote_code=False)
    raise ConfigError(f"data.tokenizer={path}: {str(e).splitlines()[0]}") from None
  if tok.eos_token_id is None:
    raise ConfigError(f"data.tokenizer={path}: tokenizer has no eos_token, needed for packing")
  return tok


def pack(docs: list[list[int]], seq_len: int, eos: int, pad: int):
  """Concatenate docs (each + EOS) and cut into rows; the last row is padded, segment 0."""
  flat, seg_flat = [], []
  for i, d in enumerate(docs):
    flat += list(d) + [eos]
    seg_flat += [i + 1] * (len(d) + 1)
  n = -(-len(flat) // seq_len)
  tokens = np.full(n * seq_len, pad, np.int32)
  segs = np.zeros(n * seq_len, np.int32)
  tokens[: len(flat)], segs[: len(flat)] = flat, seg_flat
  tokens, segs = tokens.reshape(n, seq_len), segs.reshape(n, seq_len)
  # Renumber per row (1, 2, ...) so ids stay small and a row alone is self-describing.
  for r in range(n):
    nz = segs[r] > 0
    _, segs[r, nz] = np.unique(segs[r, nz], return_inverse=True)
    segs[r, nz] += 1
  return tokens, segs


def fingerprint(spec: DataSpec, source_fp: str) -> tuple[str, str]:
  """(data fingerprint, tokenizer hash): what the packed rows are a pure function of."""
  th = tokenizer_hash(spec.tokenizer)
  return _sha(source_fp, th, spec.text_field, spec.seq_len, spec.max_rows, PACKING_VERSION), th


def build_rows(spec: DataSpec) -> Rows:
  texts, source_fp = load_texts(spec)
  tok = load_tokenizer(spec.tokenizer)
  ids = tok(texts, add_special_tokens=False)["input_ids"]
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  tokens, segs = pack(ids, spec.seq_len, tok.eos_token_id, pad)
  if spec.max_rows:
    tokens, segs = tokens[: spec.max_rows], segs[: spec.max_rows]
  fp, th = fingerprint(spec, source_fp)
  return Rows(tokens, segs, fp, th, len(tok))
