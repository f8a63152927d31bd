"""Trainer end to end on a tiny teacher: frozen params stay bit-identical, a run killed with
SIGKILL mid-stage and right after a stage boundary resumes to a bit-identical result, SIGTERM
saves and exits 0, a damaged newest checkpoint is retrained and replaced, a checkpoint of
other param groups is refused (and restart_from starts a new workdir from it), and the
renormalize / teacher_only modes and epoch-based stages lower the held-out KL."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import job_config, snapshot, write_config_file
from moedistill.config import job_from_config
from moedistill.hub import safetensors_io as st
from moedistill.train import train
from moedistill.training.checkpoint import Checkpoints

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


def small(tmp_path, teacher, **over):
  c = job_config(tmp_path, teacher, **over)
  c.stages.wrappers.steps = 6
  c.stages.all.steps = 4
  c.train.batch_size = 4
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.keep = 10
  return c


def tensors(path):
  f = st.SafetensorsFile(path)
  return {k: np.array(f.get(k)) for k in f.keys()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run, shared by the tests below."""
  from conftest import make_hf_checkpoint, make_tokenizer
  tmp = tmp_path_factory.mktemp("ref")
  make_hf_checkpoint(tmp / "teacher", vocab_size=64)
  make_tokenizer(tmp / "teacher")
  job = job_from_config(small(tmp, tmp / "teacher"))
  export = train(job, progress=False)
  return tmp, job, export


def _params_at(workdir, step):
  ck = Checkpoints(Path(workdir) / "checkpoints")
  state = ck.mngr.restore(step)["state"]
  ck.close()
  return {k: np.asarray(v) for k, v in state["params"].items()}


def test_frozen_params_are_bit_identical(reference):
  tmp, job, export = reference
  init = tensors(Path(job.student_init) / "model.safetensors")
  after1 = _params_at(job.workdir, 6)  # end of stage 1: only wrappers trained
  changed = []
  from moedistill.hub.hf import key_table
  from moedistill.model.config import ModelConfig
  from moedistill.model.shared_core import Compression
  cfg = ModelConfig.from_json_file(Path(job.student_init) / "config.json")
  for e in key_table(cfg, Compression(*job.ranks)):
    ours = after1[".".join(map(str, e.path))]
    theirs = init[e.hf_key].T if e.transpose else init[e.hf_key]
    if "wrapper" in e.hf_key:
      changed.append(not np.array_equal(ours, theirs))
    else:
      assert np.array_equal(ours, theirs), e.hf_key
  assert all(changed) and changed
  final = tensors(export / "model.safetensors")
  np.testing.assert_array_equal(final["model.embed_tokens.weight"],
                                init["model.embed_tokens.weight"])  # frozen in stage 2 too


def _run_until(cfg, workdir, step_dir, sig):
  p = subprocess.Popen([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ck = Path(workdir) / "checkpoints"
  while p.poll() is None and not (ck / str(step_dir)).exists():
    time.sleep(0.05)
  assert p.poll() is None, f"finished before checkpoint {step_dir}: {p.stderr.read()[-2000:]}"
  t0 = time.time()
  p.send_signal(sig)
  err = p.communicate(timeout=120)[1]
  return p.returncode, time.time() - t0, err


def test_sigkill_mid_stage_and_at_stage_boundary_resume_bit_identical(tmp_path, reference):
  ref_tmp, ref_job, ref_export = reference
  c = small(tmp_path, ref_tmp / "teacher")
  c.train.checkpoint_every = 1
  cfg = write_config_file(tmp_path, c)
  # Five seeded kill points: right after the stage-1 boundary (step 6) and four others.
  rng = np.random.default_rng(0)
  points = sorted({6, *rng.choice([1, 2, 3, 4, 5, 7, 8, 9], 4, replace=False).tolist()})
  for step in points:
    assert _run_until(cfg, c.workdir, step, signal.SIGKILL)[0] == -signal.SIGKILL, step
  done = subprocess.run([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stdout
  got, want = tensors(Path(c.workdir) / "export" / "model.safetensors"), tensors(
      ref_export / "model.safetensors")
  assert got.keys() == want.keys()
  for k in want:
    assert np.array_equal(got[k], want[k]), k


def test_sigterm_saves_and_exits_zero(tmp_path, reference):
  ref_tmp, _, _ = reference
  c = small(tmp_path, ref_tmp / "teacher")
  c.train.checkpoint_every = 100  # only stage ends and the SIGTERM save
  c.stages.wrappers.steps = 40
  cfg = write_config_file(tmp_path, c)
  # Wait for the first metrics line: training is under way.
  p = subprocess.Popen([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = Path(c.workdir) / "metrics.jsonl"
  while p.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.05)
  t0 = time.time()
  p.send_signal(signal.SIGTERM)
  err = p.communicate(timeout=120)[1]
  assert p.returncode == 0, err[-2000:]
  assert time.time() - t0 < 60
  assert "SIGTERM: saved checkpoint" in err
  steps = Checkpoints(Path(c.workdir) / "checkpoints").steps()
  assert steps and 0 < steps[-1] < 40


def _train_cli(cfg):
  return subprocess.run([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                        capture_output=True, text=True, timeout=600)


def _differing(a, b, select=lambda k: True):
  got, want = tensors(Path(a) / "model.safetensors"), tensors(Path(b) / "model.safetensors")
  assert got.keys() == want.keys()
  return [k for k in want if select(k) and not np.array_equal(got[k], want[k])]


def test_damaged_latest_checkpoint_is_retrained_replaced_then_silent(tmp_path, reference):
  ref_tmp, ref_job, ref_export = reference
  c = small(tmp_path, ref_tmp / "teacher")
  shutil.copytree(ref_job.workdir, c.workdir)
  work = Path(c.workdir)
  for p in ("export", "report.json"):
    shutil.rmtree(work / p, ignore_errors=True)
  latest = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  for f in (work / "checkpoints" / str(latest) / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a crash mid-write
  cfg = write_config_file(tmp_path, c)
  r = _train_cli(cfg)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"checkpoints/{latest} is unreadable" in r.stderr
  assert not _differing(work / "export", ref_export)  # bit-identical
  trained = (work / "metrics.jsonl").read_text()
  # The retrained step replaced the damaged one: the next run warns of nothing, trains nothing.
  r = _train_cli(cfg)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "warning" not in r.stderr and "unreadable" not in r.stderr, r.stderr[-3000:]
  assert f"resumed from {work / 'checkpoints' / str(latest)} " in r.stdout
  assert (work / "metrics.jsonl").read_text() == trained
  assert not _differing(work / "export", ref_export)
  # config.report.after_train=False (the tests' job_config): no report, a line saying how to
  # write it, and that command writes it.
  assert "no report (config.report.after_train=False" in r.stdout
  assert not (work / "report.json").exists()
  r = subprocess.run([sys.executable, "-m", "moedistill.report", f"--config={cfg}"],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((work / "report.json").read_text())
  assert set(report) == {"teacher", "student_init", "student_distilled"}
  assert r.stdout.strip().splitlines()[-1].startswith("distilled student")


def test_changed_groups_are_refused_then_restart_from_starts_a_new_workdir(tmp_path, reference):
  ref_tmp, ref_job, ref_export = reference
  c = small(tmp_path, ref_tmp / "teacher")
  shutil.copytree(ref_job.workdir, c.workdir)
  work = Path(c.workdir)
  c.stages.all.groups = [(".*wrapper.*", 0.0), (".*embed.*", 0.0), (".*", 1.0)]
  before = snapshot(work)
  r = _train_cli(write_config_file(tmp_path, c))
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
  ckpt = work / "checkpoints" / "10"
  assert len(errors) == 1 and errors[0].startswith(
      f"error: checkpoint {ckpt} does not match the config (it holds "), r.stderr[-3000:]
  assert f"--config.train.restart_from={ckpt} " in errors[0]
  assert snapshot(work) == before  # nothing written, nothing deleted
  # As the line says: a new workdir that starts from that checkpoint's params.
  c.workdir = str(tmp_path / "run2")
  c.train.restart_from = str(ckpt)
  c.cache.path, c.student.init_from = str(work / "cache"), str(work / "student_init")
  c.stage_order, c.stages.all.steps = "all", 2
  r = _train_cli(write_config_file(tmp_path, c, "restart.py"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"starting from the params of {ckpt}" in r.stdout
  export = tmp_path / "run2" / "export"
  assert not _differing(export, ref_export, lambda k: "wrapper" in k)  # frozen, from ckpt 10
  assert _differing(export, ref_export, lambda k: "q_proj" in k)  # trained on


@pytest.fixture(scope="module")
def demo_shared(tmp_path_factory):
  """Cache and zero-shot student paths for the embedded (trained) teacher, built by whichever
  test below runs first: a random tiny teacher is near-uniform, its KL has nowhere to go."""
  tmp = tmp_path_factory.mktemp("demo_shared")
  return str(tmp / "cache"), str(tmp / "student_init")


@pytest.mark.parametrize("mode, epochs", [("renormalize", 1.0), ("teacher_only", 0.0)])
def test_kd_modes_and_epoch_stages_lower_held_out_kl(tmp_path, demo_shared, mode, epochs):
  import math

  import moedistill
  from moedistill.data.cache import CacheReader
  from moedistill.report import evaluate_path
  c = job_config(tmp_path, "unused")
  assets = Path(moedistill.__file__).parent / "assets"
  c.teacher = str(assets / "tiny_teacher")
  c.data.train.source = [str(assets / "corpus" / "train.jsonl")]
  c.data.eval.source = [str(assets / "corpus" / "heldout.jsonl")]
  c.data.seq_len, c.data.train.max_rows, c.data.eval.max_rows = 32, 64, 16
  c.cache.path, c.student.init_from = demo_shared
  c.train.kd_mode, c.train.warmup_steps, c.train.batch_size = mode, 0, 8
  c.train.log_every = 1
  c.stage_order = "all"
  c.stages.all.steps, c.stages.all.epochs, c.stages.all.lr = (0 if epochs else 8), epochs, 3e-3
  job = job_from_config(c)
  export = train(job, progress=False)
  rows = CacheReader(job.cache_path("train")).rows
  steps = [json.loads(line)["step"] for line in open(Path(job.workdir) / "metrics.jsonl")]
  assert steps == list(range(1, (math.ceil(epochs * rows / 8) if epochs else 8) + 1))
  held_out = CacheReader(job.cache_path("eval"))
  kl = [evaluate_path(job, p, held_out)["kl"] for p in (job.student_init, export)]
  assert kl[1] < 0.8 * kl[0], kl
