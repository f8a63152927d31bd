"""compress and export killed (SIGKILL) mid-write leave the previous output intact (or none),
and a rerun gives files bit-identical to an uninterrupted run.

The kill lands at a known point: MOEDISTILL_PAUSE_AT_SHARD=k makes save_model print
`wrote shard NAME` after each shard file and stop after the k-th, so the test kills there and
first checks that the aside directory really holds k shards and nothing else finished."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import make_hf_checkpoint


def snapshot(d):
  return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def kill_after_shard(args, k):
  """Starts `python -m args` and returns once it stopped after its k-th shard file."""
  env = dict(os.environ, MOEDISTILL_PAUSE_AT_SHARD=str(k))
  p = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env=env)
  seen = []
  while len(seen) < k:
    line = p.stdout.readline()
    assert line, f"exited ({p.wait()}) after shards {seen}"
    if line.startswith("wrote shard "):
      seen.append(line.split()[-1])
  return p, seen


@pytest.mark.parametrize("command", ["compress", "export"])
def test_kill_mid_write_keeps_previous_output(tmp_path, command):
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
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", *args(out)], check=True, capture_output=True)
  want = snapshot(out)
  shards = sorted(n.name for n in want if n.suffix == ".safetensors")
  assert len(shards) >= (3 if command == "export" else 1), shards
  aside = out.with_name("out.partial")
  for k in sorted({1, len(shards)}):  # after the first shard, and after the last one
    p, seen = kill_after_shard(args(out), k)
    assert seen == shards[:k]
    assert sorted(f.name for f in aside.iterdir()) == shards[:k]  # mid-write: k shards only
    assert snapshot(out) == want  # the previous output is untouched so far
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert snapshot(out) == want
  subprocess.run([sys.executable, "-m", *args(out)], check=True, capture_output=True)
  assert snapshot(out) == want and not aside.exists()
  # no previous output: a kill leaves none at all, and a rerun completes
  fresh = tmp_path / "fresh"
  p, _ = kill_after_shard(args(fresh), 1)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not fresh.exists()
  subprocess.run([sys.executable, "-m", *args(fresh)], check=True, capture_output=True)
  assert snapshot(fresh) == want
