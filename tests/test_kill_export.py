"""compress and export killed (SIGKILL) at seeded random moments leave either no output or a
complete one, and a rerun gives files bit-identical to an uninterrupted run."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_hf_checkpoint


def snapshot(d):
  return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["compress", "export"])
def test_kill_then_rerun_is_bit_identical(tmp_path, command):
  teacher = tmp_path / "teacher"
  make_hf_checkpoint(teacher, num_hidden_layers=4, num_experts=16, hidden_size=64,
                     moe_intermediate_size=48)
  student = tmp_path / "student"
  subprocess.run([sys.executable, "-m", "moedistill.compress", f"--teacher={teacher}",
                  f"--out={student}", "--rank=8"], check=True, capture_output=True)
  if command == "compress":
    args = lambda out: ["moedistill.compress", f"--teacher={teacher}", f"--out={out}",  # noqa
                        "--rank=8", "--overwrite"]
  else:
    args = lambda out: ["moedistill.export", f"--checkpoint={student}", f"--out={out}",  # noqa
                        "--max_shard_bytes=100000", "--overwrite"]
  ref = tmp_path / "ref"
  subprocess.run([sys.executable, "-m", *args(ref)], check=True, capture_output=True)
  want = snapshot(ref)
  out = tmp_path / "out"
  rng = np.random.default_rng(1)
  for delay in sorted(rng.uniform(0.5, 4.0, 5)):
    p = subprocess.Popen([sys.executable, "-m", *args(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() or snapshot(out) == want  # never a partial output
  subprocess.run([sys.executable, "-m", *args(out)], check=True, capture_output=True)
  assert snapshot(out) == want
