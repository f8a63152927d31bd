"""compress and export killed (SIGKILL) mid-write leave the previous output intact (or none),
and a rerun gives files bit-identical to an uninterrupted run; a 2-process export equals a
1-process one.

The kill lands at a known point: the command runs under a launcher that makes each finished
shard file print `wrote shard NAME` and stops after the k-th, so the test kills there and
first checks that the aside directory really holds k shards and nothing else finished."""
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_hf_checkpoint

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


def snapshot(d):
  return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# Runs `python -m MODULE ARGS` with safetensors_io.StreamWriter.close (a shard file done)
# printing the shard's name and, after the k-th, sleeping until the test kills it.
PAUSED = """
import os, runpy, sys, time
from moedistill.hub import safetensors_io as st
k, done, close = int(sys.argv[1]), [], st.StreamWriter.close
def paused(self):
  close(self)
  done.append(os.path.basename(self.path))
  print("wrote shard", done[-1], flush=True)
  if len(done) == k:
    time.sleep(600)
st.StreamWriter.close = paused
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def kill_after_shard(args, k):
  """Starts `python -m args` and returns once it stopped after its k-th shard file."""
  p = subprocess.Popen([sys.executable, "-c", PAUSED, str(k), *args], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
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


def test_two_process_export_equals_one_process(tmp_path, teacher_dir):
  """The export CLI run by 2 processes (gloo, one CPU device each, fsdp=2: each holds half of
  every param and the export gathers one at a time) writes what one process writes; a
  non-float --dtype is one line, exit 2, nothing written."""
  from conftest import job_config, run_cli, write_config_file
  from conftest import free_port
  teacher, _ = teacher_dir
  student = tmp_path / "student"
  subprocess.run([sys.executable, "-m", "moedistill.compress", f"--teacher={teacher}",
                  f"--out={student}", "--rank=4"], check=True, capture_output=True)
  c = job_config(tmp_path, teacher)
  c.mesh.data, c.mesh.fsdp = 1, -1
  cfg = write_config_file(tmp_path, c)
  common = [f"--config={cfg}", f"--checkpoint={student}", "--max_shard_bytes=20000"]
  one = run_cli("moedistill.export", *common, f"--out={tmp_path / 'one'}")
  assert one.returncode == 0, one.stderr[-3000:]
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "moedistill.export", *common,
                             f"--out={tmp_path / 'two'}", f"--coordinator=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  want, got = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
  assert len([n for n in want if n.suffix == ".safetensors"]) > 2 and got.keys() == want.keys()
  for name in want:  # the experts' merge (a sharded einsum) may round differently
    if name.suffix != ".safetensors":
      assert got[name] == want[name], name
  from moedistill.hub import hf
  a, b = (hf.state_arrays(hf.load_model(tmp_path / d)[0]) for d in ("one", "two"))
  for k in a:
    np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-6, atol=1e-7)
  # --out defaults to <workdir>/export, --dtype to the teacher's declared dtype
  import json
  raw = json.loads((teacher / "config.json").read_text())
  (teacher / "config.json").write_text(json.dumps({**raw, "torch_dtype": "bfloat16"}))
  r = run_cli("moedistill.export", *common)
  assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / "run" / "export"
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  from moedistill.hub.safetensors_io import SafetensorsFile
  f = SafetensorsFile(next(out.glob("*.safetensors")))
  assert {f.dtype(k) for k in f.keys()} == {"BF16"}
  bad = run_cli("moedistill.export", *common, "--dtype=int8", f"--out={tmp_path / 'bad'}")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      "error: --dtype='int8': expected a float type (bfloat16, float16, float32)"], bad.stderr
  assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
