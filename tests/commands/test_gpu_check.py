"""scripts/gpu_check.sh where no GPU is lent: it refuses in one line (exit 2), and its grouped
matmul timing runs end to end at tiny shapes on CPU (--cpu_smoke), so the GPU run is not the
first time this code executes."""
import json
import os
import pathlib
import subprocess

import pytest

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=600)


def test_refuses_without_gpu():
  r = _run()
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines()[-1] == (
      "gpu_check: no GPU: jax sees cpu (cpu); this check needs an NVIDIA GPU (run it on a "
      "machine with one)")
  r = _run("--cpu_smoke", "--backends=sorted,flash")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
      "gpu_check: --backends=sorted,flash: 'flash' is not one of [")


def test_cpu_smoke_times_every_path():
  r = _run("--cpu_smoke", "--backends=sorted,pallas")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["auto"] == "sorted" and "errors" not in out, out
  assert sorted(out["gmm_fwd_bwd_tflops"]) == ["dense", "lax.ragged_dot", "pallas", "sorted"]
  assert all(v > 0 for v in out["gmm_fwd_bwd_tflops"].values()), out
