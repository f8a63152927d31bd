"""Benchmark: the whole sweep command, batched (one vmapped program per group of points)
against sequential (one `train` run per point), in the same run.

  python scripts/bench_sweep.py [--points=4] [--steps=40] [--batch=16] [--modes=off,on]

On the embedded tiny teacher (its cache and zero-shot student under runs/two_stage, built by
the demo): `python -m moedistill.sweep` over `--points` alpha values in
0.3..0.9 (one group: same k, T and stage plan), both stages of configs/two_stage.py at
`--steps` steps each, every mode in a fresh workdir under runs/bench_sweep/<mode> sharing the
cache and student. Prints each mode's wall seconds (the whole command: start-up, held-out
evaluation of teacher and zero-shot student, training, exports, per-point evaluation), the
ratio, peak RSS, and how far the batched points' held-out figures are from the sequential ones.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs the command given after it and prints its peak RSS in KiB (its only child).
PEAK_RSS = ("import resource, subprocess, sys\n"
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
BASE = ROOT / "runs" / "two_stage"


def ensure_base():
  """The demo's cache and zero-shot student: built outside the timings (the first sweep
  would otherwise build them inside its own)."""
  if not (BASE / "student_init" / "config.json").exists():
    sys.exit(f"{BASE} has no cache and student yet: run the demo first "
             "(python -m moedistill.train --config=configs/two_stage.py)")


def run_mode(mode: str, alphas: list[str], steps: int, batch: int):
  """(wall seconds, peak RSS GiB, {point: result}) of one sweep command."""
  workdir = ROOT / "runs" / "bench_sweep" / mode
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "moedistill.sweep", "--config=configs/two_stage.py",
         f"--config.workdir={workdir}", f"--config.cache.path={BASE / 'cache'}",
         f"--config.student.init_from={BASE / 'student_init'}",
         f"--config.stages.wrappers.steps={steps}", f"--config.stages.all.steps={steps}",
         f"--config.train.batch_size={batch}", f"--sweep.alpha={','.join(alphas)}",
         f"--sweep.batched={mode}"]
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], cwd=ROOT, capture_output=True,
                       text=True)
  wall = time.perf_counter() - t0
  if out.returncode:
    sys.exit(f"{mode}: exit {out.returncode}\n{out.stderr[-3000:]}")
  report = json.loads((workdir / "sweep" / "report.json").read_text())
  return wall, int(out.stdout.split()[-1]) / 2**20, {r["point"]: r for r in report["points"]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--points", type=int, default=4)
  ap.add_argument("--steps", type=int, default=40, help="steps in each of the two stages")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--modes", default="off,on")
  a = ap.parse_args()
  ensure_base()
  alphas = [f"{0.3 + 0.6 * i / max(a.points - 1, 1):.2f}" for i in range(a.points)]
  runs = {m: run_mode(m, alphas, a.steps, a.batch) for m in a.modes.split(",")}
  print(f"points={a.points} (alpha {','.join(alphas)}) steps={a.steps}+{a.steps} "
        f"batch={a.batch} rows")
  for m, (wall, rss, _) in runs.items():
    print(f"sweep --sweep.batched={m:<4} {wall:7.1f} s  "
          f"{a.points * 2 * a.steps / wall:6.2f} point-steps/s  peak RSS {rss:.2f} GiB")
  if {"off", "on"} <= set(runs):
    (seq, _, p_seq), (bat, _, p_bat) = runs["off"], runs["on"]
    print(f"batched / sequential speed: {seq / bat:.2f}x")
    for key in ("kl", "ppl", "ce"):
      rel = max(abs(p_bat[n][key] - p_seq[n][key]) / abs(p_seq[n][key]) for n in p_seq)
      print(f"largest relative difference of a point's held-out {key}: {rel:.2e}")


if __name__ == "__main__":
  main()
