"""safetensors files through the `safetensors` library (numpy, bf16 via ml_dtypes), plus the one
thing it leaves out: errors that name the file, and the tensor when one is at fault.

Reads are lazy (`safe_open` memory-maps the file; `get_slice` copies only the requested slice).
A mapping keeps every page it touched resident, so `release()` drops it once the tensors read
through it hold RELEASE_BYTES: host memory then follows what is being read, not the file, and
the file is not reopened per tensor (each `safe_open` parses the whole header again, and a
128-expert checkpoint's headers list thousands of tensors). Never pickle.
Writes: `write` is the library's save_file (all of a file's tensors at once); `StreamWriter`
writes the same format one tensor at a time, for exports whose shards outsize host memory
(benchmarks/export.py measures the two).
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from moedistill.errors import CheckpointFileError

# The dtypes the numpy side reads (BF16 arrives as ml_dtypes.bfloat16), with their sizes.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}
_NAMES = {np.dtype(d): n for n, d in (
    ("F64", np.float64), ("F32", np.float32), ("F16", np.float16), ("BF16", ml_dtypes.bfloat16),
    ("I64", np.int64), ("I32", np.int32), ("I16", np.int16), ("I8", np.int8), ("U8", np.uint8),
    ("BOOL", np.bool_))}


# The mapping is dropped once the tensors read through it (counted whole: a strided slice
# touches pages across its tensor) hold this many bytes: small enough that what the open
# mappings keep resident is a small part of a load's peak RSS, large enough that a shard's
# header is parsed a few times, not once per param (docs/benchmarks.md, loading a checkpoint).
RELEASE_BYTES = 4 << 20


class SafetensorsFile:
  """One .safetensors file: keys and shapes from the header at once, tensors on demand."""

  def __init__(self, path):
    self.path = str(path)
    self._h, self._touched, self._touched_bytes = None, set(), 0
    h = self._open()
    self.metadata = h.metadata() or {}
    self._keys = list(h.keys())
    info = {k: h.get_slice(k) for k in self._keys}
    self._shapes = {k: tuple(s.get_shape()) for k, s in info.items()}
    self._dtypes = {k: s.get_dtype() for k, s in info.items()}
    del info
    self.close()

  def _open(self):
    if self._h is None:
      try:
        self._h = safe_open(self.path, framework="numpy")
      except FileNotFoundError:
        raise CheckpointFileError(f"{self.path}: file not found") from None
      except SafetensorError as e:
        raise CheckpointFileError(f"{self.path}: {_diagnose(self.path, e)}") from None
    return self._h

  def close(self):
    """Unmaps the file (pages read so far leave this process's RSS); reads reopen it."""
    self._h, self._touched, self._touched_bytes = None, set(), 0

  def release(self):
    """close() once the tensors read since the file was opened hold RELEASE_BYTES."""
    if self._touched_bytes >= RELEASE_BYTES:
      self.close()

  def keys(self) -> list[str]:
    return list(self._keys)

  def __contains__(self, key) -> bool:
    return key in self._shapes

  def shape(self, key) -> tuple[int, ...]:
    return self._shapes[key]

  def dtype(self, key) -> str:
    return self._dtypes[key]

  def get(self, key) -> np.ndarray:
    return self.get_slice(key, ())

  def get_slice(self, key, idx) -> np.ndarray:
    """The slice `idx` (a tuple of slices/ints) of tensor `key`, reading only those bytes."""
    if self._dtypes[key] not in ITEMSIZE:
      raise CheckpointFileError(f"{self.path}: tensor {key} has unsupported dtype "
                                f"{self._dtypes[key]}")
    s = self._open().get_slice(key)
    if key not in self._touched:
      self._touched.add(key)
      self._touched_bytes += ITEMSIZE[self._dtypes[key]] * int(np.prod(self._shapes[key]))
    full = tuple(slice(None) for _ in self._shapes[key][len(idx):])
    return np.asarray(s[tuple(idx) + full] if self._shapes[key] else s[:])


def _diagnose(path, err) -> str:
  """The library's message plus what it does not say: the size shortfall or the tensor."""
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n)) if n <= size - 8 else None
  except (struct.error, ValueError, UnicodeDecodeError):
    header = None
  if header is None:
    return f"not a safetensors file (bad header: {err})"
  header.pop("__metadata__", None)
  end = 8 + n + max((v.get("data_offsets", [0, 0])[1] for v in header.values()), default=0)
  if end > size:
    return f"truncated ({size} bytes, header needs {end})"
  for k, v in header.items():
    a, b = v.get("data_offsets", [0, -1])
    if v.get("dtype") not in ITEMSIZE:
      return f"tensor {k} has unsupported dtype {v.get('dtype')}"
    if b - a != ITEMSIZE[v["dtype"]] * int(np.prod(v.get("shape", [-1]))):
      return f"tensor {k}: offsets {[a, b]} do not match shape {v.get('shape')} ({err})"
  return f"inconsistent header ({err})"


def write(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes `tensors` to `path` via a temporary file and an atomic rename."""
  tmp = f"{path}.tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
            metadata={"format": "pt", **(metadata or {})})
  os.replace(tmp, path)


class StreamWriter:
  """Writes one safetensors file tensor by tensor, in the order of `specs` [(key, shape,
  dtype)], so only the tensor being written is in memory (the library's save_file takes all
  of a file's tensors at once: a whole shard). Same format: 8-byte header size, JSON header,
  8-byte aligned data. Written to `path`.tmp and renamed by close()."""

  def __init__(self, path, specs, metadata: dict[str, str] | None = None):
    self.path, self._next = str(path), 0
    self._specs = [(k, tuple(s), np.dtype(d)) for k, s, d in specs]
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for k, shape, d in self._specs:
      n = int(np.prod(shape)) * d.itemsize
      header[k] = {"dtype": _NAMES[d], "shape": list(shape), "data_offsets": [offset, offset + n]}
      offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._f = open(self.path + ".tmp", "wb")
    self._f.write(struct.pack("<Q", len(blob)) + blob)

  def add(self, key, a: np.ndarray):
    k, shape, d = self._specs[self._next]
    if (key, tuple(a.shape), a.dtype) != (k, shape, d):
      raise ValueError(f"{self.path}: got {key} {a.shape} {a.dtype}, expected {k} {shape} {d}")
    self._f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # bf16: no buffer
    self._next += 1

  def close(self):
    if self._next != len(self._specs):
      raise ValueError(f"{self.path}: {len(self._specs) - self._next} tensors never written")
    self._f.close()
    os.replace(self.path + ".tmp", self.path)
