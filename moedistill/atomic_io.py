"""Durable writes of local files and directories: never a moment with a half-written file, or
with neither the old nor the new one.

A file is written beside its target under a temporary name, fsynced, renamed over the target
(`os.replace`, atomic on POSIX) and its directory fsynced, so after a crash the target holds
either the old or the new bytes. A directory is swapped in with `renameat2(RENAME_EXCHANGE)`
where the OS has it (Linux), else renamed aside first (see `replace_dir`).
Kvstore paths (gs://, s3://, memory://) keep their own semantics: an object write is atomic.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from pathlib import Path


def fsync_dir(path) -> None:
  """Makes a rename or a new file in directory `path` durable (a no-op where unsupported)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def fsync_files(directory) -> None:
  """Flushes every file directly in `directory`, then the directory itself, to disk."""
  for e in Path(directory).iterdir():
    if e.is_file():
      fd = os.open(e, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
  fsync_dir(directory)


def write_bytes(path, data: bytes) -> None:
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if tmp.exists():  # our own temporary file, never the target
      tmp.unlink()
    raise
  fsync_dir(path.parent)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path, obj, indent: int | None = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def _exchange(a: Path, b: Path) -> bool:
  """Atomically swaps two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the
  OS or file system cannot."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, final: Path, old: Path) -> None:
  """Moves the finished directory `new` to `final`; a previous `final` ends at `old` (the
  caller deletes it). With RENAME_EXCHANGE `final` always exists (old or new); elsewhere
  `final` is briefly missing between two renames and `old` holds it then."""
  new, final, old = Path(new), Path(final), Path(old)
  fsync_files(new)
  if final.exists():
    if _exchange(new, final):
      fsync_dir(final.parent)
      os.replace(new, old)  # `new` now holds the previous output
    else:
      os.replace(final, old)
      os.replace(new, final)
  else:
    os.replace(new, final)
  fsync_dir(final.parent)
