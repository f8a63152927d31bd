"""Safety: weights only from safetensors (a pickle checkpoint is refused, never unpickled), no
remote code, and a whole run writes nothing outside its configured paths."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import job_config, make_hf_checkpoint, make_tokenizer, write_config_file
from moedistill import hf
from moedistill.errors import CheckpointFileError


def test_pickle_checkpoint_is_refused(tmp_path):
  import torch
  make_hf_checkpoint(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (Path.touch, (marker,))

  torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(CheckpointFileError, match="neither model.safetensors"):
    hf.load_model(tmp_path)
  assert not marker.exists()


def test_no_trust_remote_code_anywhere():
  src = Path(__file__).resolve().parent.parent / "moedistill"
  for f in src.rglob("*.py"):
    text = f.read_text()
    assert "trust_remote_code=True" not in text, f
    for bad in ("import pickle", "pickle.load", "torch.load", "allow_pickle=True"):
      assert bad not in text, (f, bad)


def test_run_writes_only_inside_its_paths(tmp_path):
  teacher = tmp_path / "inputs" / "teacher"
  make_hf_checkpoint(teacher, vocab_size=64)
  make_tokenizer(teacher)
  c = job_config(tmp_path / "inputs", teacher)
  c.workdir = str(tmp_path / "work")
  c.cache.path = str(tmp_path / "cache")
  c.stages.wrappers.steps, c.stages.all.steps, c.train.batch_size = 2, 2, 4
  cfg = write_config_file(tmp_path / "inputs", c)
  home, cwd, tmpdir = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmpdir"
  for d in (home, cwd, tmpdir):
    d.mkdir()
  before = {p for p in (tmp_path / "inputs").rglob("*")}
  env = dict(os.environ, HOME=str(home), TMPDIR=str(tmpdir), XDG_CACHE_HOME=str(home / ".cache"))
  env.pop("MPLCONFIGDIR", None)
  r = subprocess.run([sys.executable, "-m", "moedistill.train", f"--config={cfg}"], cwd=cwd,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "work" / "export" / "model.safetensors").exists()
  assert (tmp_path / "cache" / "train" / "metadata.json").exists()
  written = [p for d in (home, cwd) for p in d.rglob("*") if p.is_file()]
  assert written == [], written
  assert {p for p in (tmp_path / "inputs").rglob("*")} == before
  top = {p.name for p in tmp_path.iterdir()}
  assert top == {"inputs", "work", "cache", "home", "cwd", "tmpdir"}, top
