"""Two processes on 127.0.0.1 (gloo CPU collectives): cache, two stages with checkpoints, then
(1) a kill of one process and a restart of both, (2) SIGTERM to only one process: both save
the same step and exit 0, and the rerun finishes. Each result equals a single process driving
the same 2-device mesh to float32 tolerance (gloo's all-reduce sums in another order than the
in-process one, so bits may differ; exact resume itself is tested in test_train.py). The pair
reads in its default lanes, one per process (each decodes only its own chunks); the single
process is given the same 2 lanes, so both see the same batches."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (free_port, job_config, make_hf_checkpoint, make_tokenizer, with_devices,
                      write_config_file)
from moedistill.training.checkpoint import Checkpoints
from test_train import tensors

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

STEPS = 6  # per stage


def _config(tmp, teacher, lanes=0, **over):
  c = job_config(tmp, teacher)
  c.cache.read_lanes = lanes  # 0: the process count, so 2 for a pair of processes
  c.stages.wrappers.steps, c.stages.all.steps = STEPS, STEPS
  c.train.batch_size, c.train.checkpoint_every, c.train.log_every = 4, 2, 1
  for k, v in over.items():
    c.train[k] = v
  return write_config_file(tmp, c), Path(c.workdir)


def _start_pair(cfg):
  port = free_port()
  return [subprocess.Popen([sys.executable, "-m", "moedistill.train", f"--config={cfg}",
                            f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                            f"--process_id={i}"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish_pair(cfg):
  procs = _start_pair(cfg)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The teacher and an uninterrupted single-process run on a 2-device mesh."""
  tmp = tmp_path_factory.mktemp("multihost")
  teacher = tmp / "teacher"
  make_hf_checkpoint(teacher, vocab_size=64)
  make_tokenizer(teacher)
  (tmp / "one").mkdir()
  cfg, work = _config(tmp / "one", teacher, lanes=2)  # the pair's lanes: the same batches
  env = dict(os.environ, XLA_FLAGS=with_devices(2))
  one = subprocess.run([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                       capture_output=True, text=True, env=env, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  return teacher, work


def _assert_same_export(work1, work2):
  a, b = tensors(work1 / "export" / "model.safetensors"), tensors(
      work2 / "export" / "model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    # 12 Adam steps at lr <= 3e-3: reduction-order noise in near-zero gradients moves single
    # weights by up to ~1e-3 of a step (seen: 2.7e-6), hence atol 2e-5.
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=2e-5, err_msg=k)


def test_two_processes_with_a_kill_equal_one_process(tmp_path, one_process):
  teacher, work1 = one_process
  cfg2, work2 = _config(tmp_path, teacher)
  procs = _start_pair(cfg2)
  while all(p.poll() is None for p in procs) and not (work2 / "checkpoints" / "4").exists():
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)  # one host dies mid stage 1 ...
  time.sleep(1)
  procs[0].send_signal(signal.SIGKILL)  # ... and the job is torn down
  for p in procs:
    p.communicate(timeout=60)
  assert not (work2 / "export").exists()
  outs = _finish_pair(cfg2)  # restart both
  assert "resumed from" in outs[0][0]
  _assert_same_export(work1, work2)
  ckpt = Checkpoints(work2 / "checkpoints", keep=10)
  assert ckpt.read_meta(ckpt.mngr.latest_step())["read_lanes"] == 2


def test_sigterm_to_one_process_saves_the_same_step_on_both(tmp_path, one_process):
  teacher, work1 = one_process
  cfg2, work2 = _config(tmp_path, teacher, checkpoint_every=100)  # stage ends and SIGTERM only
  procs = _start_pair(cfg2)
  metrics = work2 / "metrics.jsonl"
  while all(p.poll() is None for p in procs) and not (
      metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
  outs = [p.communicate(timeout=120) for p in procs]
  saved = []
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    saved += re.findall(r"SIGTERM: saved checkpoint at global step (\d+)", err)
  assert len(saved) == 2 and saved[0] == saved[1], saved
  step = int(saved[0])
  assert 0 < step < 2 * STEPS and not (work2 / "export").exists()
  assert sorted(int(p.name) for p in (work2 / "checkpoints").iterdir()
                if p.name.isdigit()) == sorted({step, *[s for s in (STEPS,) if s < step]})
  outs = _finish_pair(cfg2)
  assert f"resumed from {work2 / 'checkpoints' / str(step)} " in outs[0][0]
  _assert_same_export(work1, work2)
