"""Text sources -> documents, in fixed pieces; file fingerprints that survive restarts cheaply.

A source (local json/jsonl/parquet/txt files or globs, or one hub dataset name) is cut into
*pieces* that depend on the data alone, never on the process count: a jsonl/txt file into
byte blocks of `block_bytes` (a line belongs to the block where it starts, so a process seeks
straight to its blocks), a parquet file into its row groups, a JSON-array file into one piece,
a hub dataset (streamed) into its file shards. `tokens.py` packs each piece on its own.

Fingerprint: each file's sha256 is recorded with its size and mtime; a later start re-hashes
only files whose (size, mtime) changed, or all of them with `verify`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from pathlib import Path

from moedistill.errors import ConfigError

PACKING_VERSION = "piece-eos-v2"  # v2: documents packed per piece (last row padded)
EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "text"}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  source: tuple[str, ...]   # local files/globs, or one hub dataset name
  tokenizer: str            # local tokenizer directory (AutoTokenizer)
  seq_len: int
  text_field: str = "text"
  hub_config: str | None = None
  split: str = "train"
  max_rows: int = 0         # 0: all rows
  block_bytes: int = 64 * 2**20  # jsonl/txt piece size
  revision: str | None = None  # hub dataset: branch, tag or commit (None: main)
  # The config field a refusal names (config.data.train.source or config.data.eval.source);
  # not part of what the rows are made of.
  name: str = dataclasses.field(default="config.data.source", compare=False, repr=False)

  def __post_init__(self):
    if self.seq_len < 2:
      raise ConfigError(f"data.seq_len={self.seq_len}: expected >= 2")
    if self.block_bytes < 1:
      raise ConfigError(f"data.block_bytes={self.block_bytes}: expected >= 1")


@dataclasses.dataclass(frozen=True)
class Piece:
  kind: str                 # jsonl | text | json | parquet | hub
  where: str                # file path (or hub name)
  part: int                 # byte block, row group or hub shard index


def local_files(source, name: str = "config.data.source") -> list[str] | None:
  """The files a source names, or None when it is a hub dataset name ("org/dataset");
  `name`: the config field a refusal names."""
  files = []
  for s in source:
    hits = sorted(glob.glob(s))
    if not hits:
      if len(source) == 1 and not os.path.splitext(s)[1] and "/" in s and not os.path.exists(s):
        return None
      raise ConfigError(f"{name}: {s} matches no file")
    files += hits
  for f in files:
    if os.path.splitext(f)[1] not in EXTENSIONS:
      raise ConfigError(f"{name}: {f} has an unknown extension, expected one of "
                        f"{sorted(EXTENSIONS)}")
  return files


def _hub(spec: DataSpec, shard: int | None = None):
  import datasets
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  ds = datasets.load_dataset(spec.source[0], spec.hub_config, split=spec.split, streaming=True,
                             revision=spec.revision)
  return ds if shard is None else ds.shard(num_shards=ds.num_shards, index=shard)


def pieces(spec: DataSpec) -> tuple[list[Piece], int]:
  """(the source's pieces in stream order, the number of empty files skipped)."""
  files = local_files(spec.source, spec.name)
  if files is None:
    return [Piece("hub", spec.source[0], i) for i in range(_hub(spec).num_shards)], 0
  out, empty = [], 0
  for f in files:
    kind, size = EXTENSIONS[os.path.splitext(f)[1]], os.path.getsize(f)
    if size == 0:
      empty += 1  # counted in the metadata (`empty_files`), never silently
    elif kind in ("jsonl", "text"):
      out += [Piece(kind, f, b) for b in range(-(-size // spec.block_bytes))]
    elif kind == "parquet":
      import pyarrow.parquet as pq
      out += [Piece(kind, f, g) for g in range(pq.ParquetFile(f).num_row_groups)]
    elif _is_json_array(f):
      out.append(Piece(kind, f, 0))
    else:  # a .json file of JSON lines
      out += [Piece("jsonl", f, b) for b in range(-(-size // spec.block_bytes))]
  return out, empty


def _is_json_array(path: str) -> bool:
  with open(path, "rb") as fh:
    return fh.read(4096).lstrip().startswith(b"[")


def _line_number(path: str, offset: int) -> int:
  """1-based line at a byte offset (only on the error path: it reads the file up to there)."""
  with open(path, "rb") as fh:
    return fh.read(offset).count(b"\n") + 1


def _block_lines(path: str, block: int, size: int):
  """(byte offset, raw line) of the lines that start in byte block `block`."""
  lo, hi = block * size, (block + 1) * size
  with open(path, "rb") as fh:
    if lo:
      fh.seek(lo - 1)
      fh.readline()  # finishes the line that started before this block
    pos = fh.tell()
    while pos < hi:
      line = fh.readline()
      if not line:
        return
      yield pos, line
      pos += len(line)


def _record_text(record, field: str, where) -> str:
  if not isinstance(record, dict) or field not in record:
    keys = f"; keys are {sorted(record)}" if isinstance(record, dict) else ""
    raise ConfigError(f"data.text_field={field!r} not in {where()}{keys}")
  text = record[field]
  if text is not None and not isinstance(text, str):
    raise ConfigError(f"data.text_field={field!r} in {where()} is a {type(text).__name__}, "
                      "expected a string")
  return text or ""


def _line_docs(piece: Piece, spec: DataSpec):
  for pos, raw in _block_lines(piece.where, piece.part, spec.block_bytes):
    where = lambda: f"{piece.where} line {_line_number(piece.where, pos)}"  # noqa: E731
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ConfigError(f"{spec.name}: {where()} is not valid UTF-8 (byte {e.start} of the "
                        "line)") from None
    if piece.kind == "text":
      yield line.rstrip("\r\n")
    elif line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{spec.name}: {where()} is not valid JSON ({_json_reason(e)})"
                          ) from None
      yield _record_text(record, spec.text_field, where)


def docs(piece: Piece, spec: DataSpec):
  """The piece's documents in order ("" for empty ones: the packer counts and skips them)."""
  if piece.kind == "text" and spec.text_field != "text":
    raise ConfigError(f"data.text_field={spec.text_field!r}: .txt files only have 'text'")
  if piece.kind in ("jsonl", "text"):
    yield from _line_docs(piece, spec)
  elif piece.kind == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(piece.where)
    if spec.text_field not in pf.schema_arrow.names:
      raise ConfigError(f"data.text_field={spec.text_field!r} not in {piece.where}; columns "
                        f"are {pf.schema_arrow.names}")
    kind = pf.schema_arrow.field(spec.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise ConfigError(f"data.text_field={spec.text_field!r} in {piece.where} is a {kind} "
                        "column, expected strings")
    for t in pf.read_row_group(piece.part, columns=[spec.text_field]).column(0).to_pylist():
      yield t or ""
  elif piece.kind == "json":
    yield from _json_array_docs(piece.where, spec.text_field, spec.name)
  else:
    for i, r in enumerate(_hub(spec, piece.part)):
      yield _record_text(r, spec.text_field, lambda: f"record {i} of {spec.source[0]} shard "
                         f"{piece.part}")


def _json_reason(e: json.JSONDecodeError) -> str:
  """json's message and where in the line: its `msg` alone can read as cut off ("Invalid
  control character at", the position being the rest of the sentence)."""
  return f"{e.msg}: column {e.colno}"


def _json_array_docs(path: str, field: str, name: str = "config.data.source"):
  """A .json file holds one array of records (read whole: use jsonl for large data)."""
  try:
    records = json.loads(Path(path).read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ConfigError(f"{name}: {path} is not valid UTF-8 (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{name}: {path} is not valid JSON ({_json_reason(e)}, line {e.lineno})"
                      ) from None
  if not isinstance(records, list):
    raise ConfigError(f"{name}: {path} holds a JSON {type(records).__name__}, expected "
                      "an array of records (or use .jsonl)")
  for i, r in enumerate(records):
    yield _record_text(r, field, lambda: f"record {i} of {path}")


def sha(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def file_sha(path: str) -> str:
  with open(path, "rb") as fh:
    return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def file_records(spec: DataSpec, old: list[dict] | None = None, verify: bool = False):
  """[{path, size, mtime_ns, sha}] of the source's files, re-hashing only those whose size or
  mtime differ from `old` (all with `verify`); None for a hub dataset."""
  files = local_files(spec.source, spec.name)
  if files is None:
    return None
  known = {r["path"]: r for r in old or []}
  out = []
  for f in files:
    st = os.stat(f)
    r = known.get(os.path.abspath(f))
    if verify or r is None or (r["size"], r["mtime_ns"]) != (st.st_size, st.st_mtime_ns):
      r = {"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "sha": file_sha(f)}
    out.append(r)
  return out


def tokenizer_hash(path) -> str:
  files = sorted(p for p in Path(path).iterdir()
                 if p.is_file() and ("token" in p.name or p.name in ("vocab.json", "merges.txt")))
  return sha(*[sha(p.name, p.read_bytes()) for p in files])


def hub_revision(spec: DataSpec) -> str:
  """The commit a hub dataset's revision (branch or tag, default main) points at now, so new
  commits on a branch change the fingerprint; where the hub cannot be asked (offline), the
  revision as configured."""
  rev = spec.revision or "main"
  if len(rev) == 40 and all(ch in "0123456789abcdef" for ch in rev):
    return rev
  try:
    from huggingface_hub import HfApi
    return HfApi().dataset_info(spec.source[0], revision=rev).sha or rev
  except Exception:  # noqa: BLE001 - offline or unreachable: the configured name
    return rev


def fingerprint(spec: DataSpec, records: list[dict] | None) -> str:
  """What the packed rows are a pure function of: file contents (not their location),
  tokenizer, field, row length, row limit, piece size and packing rule."""
  src = (sha("hub", spec.source[0], spec.hub_config, spec.split, hub_revision(spec))
         if records is None
         else sha("files", *[r["sha"] for r in records]))
  return sha(src, tokenizer_hash(spec.tokenizer), spec.text_field, spec.seq_len, spec.max_rows,
             spec.block_bytes, PACKING_VERSION)


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
  if not getattr(tok, "is_fast", False):
    raise ConfigError(f"data.tokenizer={path}: not a fast (Rust) tokenizer; expected a "
                      "directory with tokenizer.json")
  return tok
