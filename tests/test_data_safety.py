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


# --- 2. only proven damage falls back ------------------------------------------------------

@pytest.mark.parametrize("where, error", [
    ("restore", RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")),
    ("restore", MemoryError()),
    ("read_meta", PermissionError(13, "Permission denied")),
    ("restore", ValueError("UNAVAILABLE: Connection reset by peer")),
])
def test_out_of_memory_during_restore_stops_and_deletes_nothing(tmp_path, capsys, monkeypatch,
                                                                 where, error):
  from test_checkpoint_recovery import listing, state_of, params_of
  from moedistill.training.checkpoint import (CheckpointReadError, Checkpoints, abstract_like)
  path = tmp_path / "ck"
  ck = Checkpoints(path, async_save=False)
  states = {s: state_of(params_of(seed=s)) for s in (1, 2)}
  for s, st in states.items():
    ck.save(s, st, {"stage": 0, "step_in_stage": s})
  ck.close()
  before = listing(path)

  def fail(self, *a, **k):
    raise error
  monkeypatch.setattr(Checkpoints, where, fail)
  ck = Checkpoints(path, async_save=False)
  with pytest.raises(CheckpointReadError) as e:
    ck.restore_latest(lambda step, meta: abstract_like(states[2]))
  msg = str(e.value)
  assert "\n" not in msg and f"checkpoint {path / '2'} could not be read" in msg, msg
  assert type(error).__name__ in msg and "nothing was deleted" in msg
  assert ck.damaged == set() and "unreadable" not in capsys.readouterr().err
  ck.close()
  assert listing(path) == before and Checkpoints(path).steps() == [1, 2]
