"""cache.clear deletes every name moedistill writes at a split's path, files and directories
alike, and refuses a path holding anything else before deleting anything."""
import pytest

from moedistill.data import cache
from moedistill.errors import UserError


def _fill(root):
  root.mkdir(exist_ok=True)
  for name in ("metadata.json", "tokens.json"):
    (root / name).write_text("{}")
  for name in ("tokens", "segment_ids", "tokens_done", "repair"):
    (root / name / "c" / "0").mkdir(parents=True)
    (root / name / "zarr.json").write_text("{}")
    for j in range(3):
      (root / name / "c" / "0" / str(j)).write_bytes(b"x")


def test_clear_deletes_files_and_directories_every_time(tmp_path):
  # Each round has top-level files next to directories: deleting `metadata.json/` while
  # metadata.json is still a file fails in the file driver, so 30 rounds catch any overlap.
  for i in range(30):
    root = tmp_path / str(i)
    _fill(root)
    cache.clear(str(root))
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_clear_refuses_a_path_holding_a_foreign_file(tmp_path):
  _fill(tmp_path)
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="notes.txt"):
    cache.clear(str(tmp_path))
  assert (tmp_path / "notes.txt").read_text() == "mine"
  assert (tmp_path / "metadata.json").exists() and (tmp_path / "tokens" / "zarr.json").exists()
