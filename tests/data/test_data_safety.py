"""Data safety (issue 22, items 1-5): nothing the project did not write is deleted; only
proven damage makes a checkpoint count as unreadable; artifacts are reused only when what made
them matches; metrics have no repeated steps after a kill and resume; a damaged cache chunk is
found by `cache_logits --verify` and recomputed by `cache_logits --repair`."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import job_config, run_cli, write_config_file

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


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


# --- 3. reuse only what matches -------------------------------------------------------------

def test_student_init_made_at_rank_4_is_refused_for_a_run_at_rank_8(tmp_path, teacher_dir):
  from moedistill import sharding, train
  from moedistill.config import job_from_config
  from moedistill.errors import UserError
  job4 = job_from_config(job_config(tmp_path, teacher_dir[0], **{"student.rank": 4}))
  mesh = sharding.make_mesh(job4.mesh)
  path = train.ensure_student(job4, mesh)
  before = {p.name: p.read_bytes() for p in path.iterdir()}
  assert train.ensure_student(job4, mesh) == path  # the same config reuses it
  job8 = job_from_config(job_config(tmp_path, teacher_dir[0], **{"student.rank": 8}))
  with pytest.raises(UserError) as e:
    train.ensure_student(job8, mesh)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("student.rank=8:") and "rank_gate=4" in msg, msg
  job_up = job_from_config(job_config(tmp_path, teacher_dir[0],
                                      **{"student.rank": 4, "student.rank_up": 6}))
  with pytest.raises(UserError, match=r"^student\.rank_up=6: .* rank_up=4"):
    train.ensure_student(job_up, mesh)
  assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_teacher_hash_sees_the_weights_and_student_init_another_teacher(tmp_path, teacher_dir):
  from moedistill import sharding, train
  from moedistill.cache_logits import teacher_hash
  from moedistill.config import job_from_config
  from moedistill.errors import UserError
  teacher = teacher_dir[0]
  job = job_from_config(job_config(tmp_path, teacher, **{"student.rank": 4}))
  train.ensure_student(job, sharding.make_mesh(job.mesh))
  h = teacher_hash(teacher)
  f = teacher / "model.safetensors"
  data = bytearray(f.read_bytes())
  data[-3] ^= 0x55  # same names, same size, same header: other weights
  f.write_bytes(bytes(data))
  assert teacher_hash(teacher) != h
  with pytest.raises(UserError, match=r"^teacher=.*: the zero-shot student at .* was made "
                     "from a teacher with other contents"):
    train.ensure_student(job, sharding.make_mesh(job.mesh))


def test_hub_dataset_fingerprint_includes_its_revision():
  from moedistill.data.sources import DataSpec, fingerprint
  tok = Path(__file__).resolve().parents[2] / "moedistill" / "assets" / "tiny_teacher"
  a = DataSpec(("org/data",), str(tok), 16, revision="main")
  b = DataSpec(("org/data",), str(tok), 16, revision="0123abc")
  assert fingerprint(a, None) != fingerprint(b, None)


def test_sweep_reuses_a_result_only_with_the_same_settings(tmp_path, teacher_dir):
  from moedistill import atomic_io
  from moedistill.config import job_from_config
  from moedistill.errors import UserError
  from moedistill.sweep import point_config, point_settings, reuse_result
  base = job_config(tmp_path, teacher_dir[0])
  p = {"alpha": 0.5}
  job = job_from_config(point_config(base, p))
  Path(job.workdir).mkdir(parents=True)
  atomic_io.write_json(Path(job.workdir, "result.json"),
                       {"point": "a0.5", "kl": 1.0, "settings": point_settings(job)})
  assert reuse_result(job, p)["kl"] == 1.0
  base.train.batch_size = 40
  changed = job_from_config(point_config(base, p))
  with pytest.raises(UserError, match=r"^sweep point a0\.5: .*result\.json was made with "
                     r"train\.batch_size=\d+, the config has 40; delete"):
    reuse_result(changed, p)


# --- 4. durability: metrics after a kill and resume ------------------------------------------

def test_metrics_have_no_repeated_step_after_a_kill_and_resume(tmp_path, teacher_dir):
  import signal
  import subprocess
  import sys
  import time
  c = job_config(tmp_path, teacher_dir[0])
  c.stages.wrappers.steps = 3
  c.stages.all.steps = 40
  c.train.batch_size = 4
  c.train.checkpoint_every = 1000  # checkpoints at the stage ends only: 3 and 43
  c.train.log_every = 1
  cfg = write_config_file(tmp_path, c)
  metrics = Path(c.workdir) / "metrics.jsonl"

  def logged():
    if not metrics.exists():
      return []
    return [json.loads(x)["global_step"] for x in metrics.read_text().splitlines()
            if x.endswith("}")]
  p = subprocess.Popen([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  while p.poll() is None and max(logged(), default=0) < 6:  # rows 4.. are past checkpoint 3
    time.sleep(0.02)
  assert p.poll() is None, p.stderr.read()[-2000:]
  p.send_signal(signal.SIGKILL)
  p.communicate(timeout=120)
  assert max(logged()) >= 6 and (Path(c.workdir) / "checkpoints" / "3").exists()
  done = run_cli("moedistill.train", f"--config={cfg}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stdout
  steps = logged()
  assert steps == list(range(1, 44)), steps


# --- 5. damaged cache chunks: --verify finds them, --repair recomputes only them -------------

@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
  """An undamaged train cache made by the command, and the config that made it."""
  from conftest import make_hf_checkpoint, make_tokenizer
  tmp = tmp_path_factory.mktemp("cache")
  make_hf_checkpoint(tmp / "teacher", vocab_size=64)
  make_tokenizer(tmp / "teacher")
  c = job_config(tmp, tmp / "teacher", train_docs=80)
  c.cache.path = str(tmp / "cache")
  r = run_cli("moedistill.cache_logits", f"--config={write_config_file(tmp, c)}",
              "--split=train")
  assert r.returncode == 0, r.stderr[-3000:]
  return c, tmp / "cache" / "train"


def all_arrays(path):
  """{array: (dtype, bytes)} of every array of a cache, read whole."""
  import tensorstore as ts
  out = {}
  for z in sorted(Path(path).glob("*/zarr.json")):
    a = ts.open({"driver": "zarr3", "kvstore": f"file://{z.parent}/"}).result()
    v = a.read().result()
    out[z.parent.name] = (str(v.dtype), v.tobytes())
  return out


def truncate(f):
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("array, chunk_file, rows", [
    ("topk_logit", "topk_logit/c/1/0/0", "4-7"),  # a logits chunk: rows 4-7
    ("tokens", "tokens/c/0/0", "0-"),              # a token shard: its 64 row chunks
])
def test_truncated_chunk_verify_names_rows_and_repair_is_bit_identical(
    tmp_path, built_cache, array, chunk_file, rows):
  import shutil
  from moedistill.data.cache import CacheReader
  from moedistill.errors import UserError
  c, undamaged = built_cache
  c = c.copy_and_resolve_references()
  c.cache.path = str(tmp_path / "cache")
  shutil.copytree(undamaged, tmp_path / "cache" / "train")
  path = tmp_path / "cache" / "train"
  want = all_arrays(undamaged)
  truncate(path / chunk_file)
  with pytest.raises(UserError, match=r"cache_logits --config=\.\.\. --repair"):
    CacheReader(str(path)).read_rows(np.arange(8))  # the reader names the command
  cfg = write_config_file(tmp_path, c)
  files = lambda: {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}  # noqa: E731
  before = files()

  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=train", "--verify")
  assert r.returncode == 2, r.stdout + r.stderr[-3000:]
  assert f"array {array} damaged at rows {rows}" in r.stdout, r.stdout
  last = r.stderr.strip().splitlines()[-1]
  assert f"train {array} rows {rows}" in last and "--repair" in last, last
  assert files() == before  # --verify changed nothing

  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=train", "--repair")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "recomputed" in r.stdout
  assert all_arrays(path) == want
  assert not any(p.is_file() for p in (path / "repair").rglob("*"))  # the scratch is gone
  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=train", "--verify")
  assert r.returncode == 0 and "damaged" not in r.stdout, r.stdout + r.stderr[-2000:]


def test_replacing_an_export_never_leaves_neither(tmp_path, teacher_dir, monkeypatch):
  import os
  from moedistill.hub import hf
  from moedistill.model.layers import Runtime
  model, _ = hf.load_model(teacher_dir[0], Runtime())
  out = tmp_path / "export"
  hf.save_model(model, out)
  missing, real = [], os.replace

  def watched(a, b):
    real(a, b)
    missing.append(not (out / "config.json").exists())  # after every rename
  monkeypatch.setattr(os, "replace", watched)
  hf.save_model(model, out)
  assert missing and not any(missing), missing
  assert (out / "model.safetensors").exists() and not (tmp_path / "export.old").exists()
