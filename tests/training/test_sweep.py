"""The sweep: top-k' emulated exactly from a top-k cache (each KD mode), a point equals a plain
`train` run with the same settings to the bit, a killed sweep reuses its done points, and bad
grids are refused before anything is written."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import job_config, make_hf_checkpoint, make_tokenizer, run_cli, write_config_file
from moedistill.config import job_from_config

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


def small(tmp, teacher, **over):
  Path(tmp).mkdir(parents=True, exist_ok=True)
  c = job_config(tmp, teacher, **over)
  c.stages.wrappers.steps = 3
  c.stages.all.steps = 3
  c.train.batch_size = 4
  c.train.log_every = 1
  return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sweep")
  make_hf_checkpoint(tmp / "teacher", vocab_size=64)
  make_tokenizer(tmp / "teacher")
  return tmp, tmp / "teacher"


@pytest.mark.parametrize("mode", ["bucket", "renormalize", "teacher_only"])
def test_topk_prime_equals_a_smaller_cache(teacher, mode):
  from moedistill.cache_logits import build_cache
  from moedistill.data.cache import CacheReader
  from moedistill.hub import hf
  from moedistill.training.train_step import StepConfig, micro_loss
  tmp, t = teacher
  readers = {}
  for k in (8, 3):
    job = job_from_config(small(tmp / f"k{k}", t, **{"cache.k": k}))
    build_cache(job, "eval", progress=False)
    readers[k] = CacheReader(job.cache_path("eval"))
  model, _ = hf.load_model(t)
  rows = np.arange(min(readers[8].rows, 4))
  big, few = readers[8].read_rows(rows), readers[3].read_rows(rows)
  np.testing.assert_array_equal(big["topk_idx"][..., :3], few["topk_idx"])

  def sums(batch, k):
    sc = StepConfig(alpha=0.7, temperature=2.0, mode=mode,
                    t_index=1 if mode == "bucket" else None, vocab_chunk=32, micro_batches=1,
                    aux_coef=0.0, top_k=2, k=k)
    b = {key: jnp.asarray(v) for key, v in batch.items()}
    return {key: float(v) for key, v in micro_loss(model, b, 1.0, sc)[1].items()}

  truncated, direct = sums(big, 3), sums(few, 0)
  assert truncated == direct
  assert truncated["kl"] != sums(big, 0)["kl"]  # k' really changed the loss


def kill_when(cmd, ready, timeout=600):
  """Runs cmd and SIGKILLs it as soon as ready() holds (or when it exits or times out)."""
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + timeout
  while not ready() and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()


def _sweep(cfg, *args, **kw):
  return [sys.executable, "-m", "moedistill.sweep", f"--config={cfg}", *args]


def test_sweep_kill_resume_and_equal_to_train(teacher):
  from moedistill.data.cache import CacheReader
  from moedistill.report import evaluate_path
  from moedistill.train import train
  tmp, t = teacher
  c = small(tmp / "run", t)
  cfg = write_config_file(tmp, c, "sweep_cfg.py")
  root = Path(c.workdir) / "sweep"
  cmd = _sweep(cfg, "--sweep.alpha=0.5", "--sweep.k=4,8")
  first, second = root / "a0.5_k4" / "result.json", root / "a0.5_k8" / "result.json"
  kill_when(cmd, first.exists)
  assert first.exists() and not second.exists(), "the kill must land between the points"
  done_before = first.read_text()
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "a0.5_k4: done, reused" in out.stdout
  assert first.read_text() == done_before
  report = json.loads((root / "report.json").read_text())
  assert [r["point"] for r in report["points"]] == ["a0.5_k4", "a0.5_k8"]
  assert report["best"]["point"] in ("a0.5_k4", "a0.5_k8")
  assert (root / "sweep.png").stat().st_size > 0

  # The same settings as a plain train run, in another workdir (same cache and student).
  c2 = small(tmp / "plain", t, **{"train.alpha": 0.5, "train.k": 4})
  c2.cache.path, c2.student.init_from = str(Path(c.workdir) / "cache"), str(
      Path(c.workdir) / "student_init")
  job = job_from_config(c2)
  export = train(job, progress=False)
  plain = evaluate_path(job, export, CacheReader(job.cache_path("eval")))
  point = report["points"][0]
  for key in ("kl", "ppl", "top1_agreement", "ce"):
    assert point[key] == plain[key], key


@pytest.mark.parametrize("args,needle", [
    (["--sweep.temperature=3"], "temperature=3.0 is not among"),
    (["--sweep.k=99"], "config.train.k=99"),
    ([], "the sweep grid is empty"),
    (["--sweep.alpha=high"], "--sweep.alpha='high'"),
])
def test_bad_grid_one_line_nothing_written(teacher, tmp_path, args, needle):
  _, t = teacher
  c = small(tmp_path, t)
  cfg = write_config_file(tmp_path, c)
  out = run_cli("moedistill.sweep", f"--config={cfg}", *args)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], out.stderr
  assert not Path(c.workdir).exists()


@pytest.fixture(scope="module")
def built(teacher):
  """A cache and zero-shot student that the batched-sweep tests share."""
  from moedistill import train
  tmp, t = teacher
  job = job_from_config(small(tmp / "base", t))
  mesh = train.preflight(job)
  train.ensure_caches(job, mesh)
  train.ensure_student(job, mesh)
  return job


def on_built(tmp, t, built, name):
  c = small(tmp / name, t)
  c.cache.path, c.student.init_from = built.cache.path, built.student_init
  c.train.checkpoint_every = 1
  return c


def test_batched_groups_points_that_differ_only_in_alpha(teacher, tmp_path):
  from moedistill.sweep import (AUTO_MAX_TOKENS, parse_grid, plan_groups, point_config,
                                point_name)
  _, t = teacher
  c = small(tmp_path, t)
  grid = parse_grid({"alpha": ["0.5", "0.9"], "k": ["4", "8"], "temperature": None,
                     "stage_order": None}, None)
  jobs = [job_from_config(point_config(c, p)) for p in grid]
  names = lambda groups: [[point_name(grid[i]) for i in m] for m, _ in groups]  # noqa: E731
  assert names(plan_groups(jobs, grid, set(), "on", True)) == [
      ["a0.5_k4", "a0.9_k4"], ["a0.5_k8", "a0.9_k8"]]
  assert names(plan_groups(jobs, grid, set(), "off", False)) == [[point_name(p)] for p in grid]
  # auto on one CPU device: the measured rule batches small steps only
  assert plan_groups(jobs, grid, set(), "auto", True) == plan_groups(jobs, grid, set(), "on", True)
  c.train.batch_size = 4 * (AUTO_MAX_TOKENS // (4 * c.data.seq_len) + 1)
  big = [job_from_config(point_config(c, p)) for p in grid]
  assert names(plan_groups(big, grid, set(), "auto", True)) == [[point_name(p)] for p in grid]
  # a done point leaves its group; a group dir that holds it (killed between exports) is
  # finished as it was, its done point not exported again
  assert names(plan_groups(jobs, grid, {0}, "on", True)) == [["a0.5_k8", "a0.9_k8"], ["a0.9_k4"]]
  g = Path(jobs[0].workdir).parent / "_group_x"
  g.mkdir(parents=True)
  (g / "members.json").write_text(json.dumps(["a0.5_k4", "a0.9_k4"]))
  groups = plan_groups(jobs, grid, {0}, "on", True)
  assert names(groups)[0] == ["a0.5_k4", "a0.9_k4"] and groups[0][1] == {2}


def test_batched_on_refused_where_it_cannot_run(teacher, tmp_path):
  from types import SimpleNamespace

  from moedistill.errors import UserError
  from moedistill.sweep import batched_allowed
  _, t = teacher
  job = job_from_config(small(tmp_path, t))
  with pytest.raises(UserError, match="--sweep.batched=on: not available with a mesh of more"):
    batched_allowed("on", job, SimpleNamespace(size=2))
  assert not batched_allowed("auto", job, SimpleNamespace(size=2))
  assert batched_allowed("auto", job, SimpleNamespace(size=1))


def test_batched_sweep_kill_resume_and_close_to_sequential(teacher, built):
  """SIGKILL inside the group's training, rerun: the result equals an uninterrupted batched
  run to the bit, and a sequential (plain train) point to a relative 1e-5."""
  from moedistill.sweep import run_sweep
  tmp, t = teacher
  c = on_built(tmp, t, built, "batched")
  cfg = write_config_file(tmp, c, "batched_cfg.py")
  root = Path(c.workdir) / "sweep"
  cmd = _sweep(cfg, "--sweep.alpha=0.5,0.9", "--sweep.batched=on")
  kill_when(cmd, lambda: list(root.glob("_group_*/checkpoints/4")))
  assert list(root.glob("_group_*/checkpoints/4")) and not list(root.glob("*/result.json"))
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "training together" in out.stdout and "resumed from" in out.stdout
  resumed = json.loads((root / "report.json").read_text())["points"]
  assert [r["point"] for r in resumed] == ["a0.5", "a0.9"]

  grid = [{"alpha": 0.5}, {"alpha": 0.9}]
  once = run_sweep(on_built(tmp, t, built, "batched_once"), grid, "on")["points"]
  seq = run_sweep(on_built(tmp, t, built, "sequential"), grid[1:], "off")["points"]
  for key in ("kl", "ppl", "top1_agreement", "ce"):
    assert [r[key] for r in resumed] == [r[key] for r in once], key
    np.testing.assert_allclose(resumed[1][key], seq[0][key], rtol=1e-5, err_msg=key)
  assert resumed[0]["kl"] != resumed[1]["kl"]  # the points really trained apart
  point = lambda name, r: Path(r, "sweep", name, "export", "model.safetensors")  # noqa: E731
  assert point("a0.9", c.workdir).read_bytes() == point("a0.9", tmp / "batched_once" /
                                                        "run").read_bytes()
  # each point's own metrics.jsonl, as a sequential point writes it
  losses = lambda r: [json.loads(x)["loss"] for x in  # noqa: E731
                      Path(r, "sweep", "a0.9", "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(losses(tmp / "batched_once" / "run"),
                             losses(tmp / "sequential" / "run"), rtol=1e-5)
