"""Data safety (issue 22, items 1-5): nothing the project did not write is deleted; only
proven damage makes a checkpoint count as unreadable; artifacts are reused only when what made
them matches; metrics have no repeated steps after a kill and resume; a damaged cache chunk is
found by `cache_logits --verify` and recomputed by `cache_logits --repair`."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import job_config, run_cli, write_config_file


# --- 1. never delete what the project did not write ----------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_user_file_under_cache_path_survives(tmp_path, teacher_dir, overwrite):
  c = job_config(tmp_path, teacher_dir[0])
  c.cache.path = str(tmp_path / "home")
  user = tmp_path / "home" / "train" / "notes" / "mine.txt"
  user.parent.mkdir(parents=True)
  user.write_text("not a cache")
  cfg = write_config_file(tmp_path, c)
  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=train", "--phase=tokens",
              *(["--overwrite"] if overwrite else []))
  assert r.returncode == 2, r.stderr[-2000:]
  line = r.stderr.strip().splitlines()[-1]
  assert str(tmp_path / "home" / "train") in line and "notes/mine.txt" in line, line
  assert user.read_text() == "not a cache"


def test_save_model_never_replaces_a_directory_it_did_not_write(tmp_path, teacher_dir):
  from moedistill.errors import CheckpointFileError
  from moedistill.hub import hf
  from moedistill.model.layers import Runtime
  model, _ = hf.load_model(teacher_dir[0], Runtime())
  out = tmp_path / "out"
  out.mkdir()
  (out / "thesis.tex").write_text("mine")
  with pytest.raises(CheckpointFileError, match=r"out: holds thesis\.tex, which moedistill "
                     "did not write"):
    hf.save_model(model, out)
  assert (out / "thesis.tex").read_text() == "mine" and not (out.parent / "out.partial").exists()
  (out / "thesis.tex").unlink()
  hf.save_model(model, out)  # its own output is replaced, old and new never both missing
  first = (out / "model.safetensors").read_bytes()
  hf.save_model(model, out)
  assert (out / "model.safetensors").read_bytes() == first
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
