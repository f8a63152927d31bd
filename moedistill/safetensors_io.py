"""Minimal safetensors reader/writer on numpy (bf16 via ml_dtypes), tensor by tensor.

Reading memory-maps the file, so a tensor costs host memory only while it is used; the header
is checked against the file size, so a truncated file is refused with its name. Never pickle.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from moedistill.errors import CheckpointFileError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
  def __init__(self, path):
    self.path = str(path)
    try:
      size = os.path.getsize(self.path)
      with open(self.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError("header longer than file")
        header = json.loads(f.read(n))
    except FileNotFoundError:
      raise CheckpointFileError(f"{self.path}: file not found") from None
    except (struct.error, ValueError, UnicodeDecodeError):
      raise CheckpointFileError(f"{self.path}: not a safetensors file (bad header)") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header, self.offset = header, 8 + n
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if self.offset + end > size:
      raise CheckpointFileError(
          f"{self.path}: truncated ({size} bytes, header needs {self.offset + end})")
    self._mm = None

  def keys(self):
    return list(self.header)

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in DTYPES:
      raise CheckpointFileError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    a, b = info["data_offsets"]
    raw = self._mm[self.offset + a: self.offset + b]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes `tensors` (key order kept) to `path` via a temporary file and an atomic rename."""
  header, offset = {}, 0
  for k, v in tensors.items():
    nbytes = v.size * v.dtype.itemsize
    header[k] = {"dtype": NAMES[np.dtype(v.dtype)], "shape": list(v.shape),
                 "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for v in tensors.values():
      f.write(np.ascontiguousarray(v).tobytes())
  os.replace(tmp, path)
