"""Every benchmark still runs: `python -m benchmarks run --smoke` (tiny shapes) exits 0 and
each prints a JSON record that names the commit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_benchmark_runs_on_tiny_shapes():
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--smoke"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{"benchmark"')]
  from benchmarks.__main__ import BENCHMARKS
  assert sorted(x["benchmark"] for x in records) == sorted(BENCHMARKS)
  assert all(x["machine"]["commit"] for x in records)
  speed = next(x for x in records if x["benchmark"] == "speed")
  assert speed["cache"]["tokens_per_s"] > 0 and speed["train"]["tokens_per_s"] > 0


def test_an_unknown_benchmark_is_refused():
  r = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--only=nope"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "'nope' is no benchmark" in r.stderr
