"""The whole sweep command, batched (one vmapped program per group of points) against
sequential (one `train` run per point, the baseline), in the same run.

  python -m benchmarks.sweep [--points=4] [--steps=40] [--batch=16] [--modes=off,on]

On the embedded tiny teacher (its cache and zero-shot student under runs/two_stage, built by
the demo): `python -m moedistill.sweep` over `--points` alpha values in 0.3..0.9 (one group:
same k, T and stage plan), both stages of configs/two_stage.py at `--steps` steps each, every
mode in a fresh workdir under runs/bench_sweep/<mode> sharing the cache and student. Records
each mode's wall seconds (the whole command: start-up, held-out evaluation of teacher and
zero-shot student, training, exports, per-point evaluation), the ratio, peak RSS, and how far
the batched points' held-out figures are from the sequential ones. `--smoke` builds its own
small cache and student in a temporary directory first (not timed) and runs the batched mode.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("points", 4, "alpha values in 0.3..0.9")
flags.DEFINE_integer("steps", 40, "steps in each of the two stages")
flags.DEFINE_integer("batch", 16, "rows per step")
flags.DEFINE_list("modes", ["off", "on"], "values of --sweep.batched to time")
flags.DEFINE_bool("smoke", False, "2 points of 2 steps of stage `all`, batched, on a 32-row "
                  "cache of 32 tokens built in a temporary directory (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

# Runs the command given after it and prints its peak RSS in KiB (its only child).
PEAK_RSS = ("import resource, subprocess, sys\n"
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
DEMO = common.REPO / "runs" / "two_stage"
# Smoke: few short rows, no generation metric.
SMALL = ("--config.data.seq_len=32", "--config.data.train.max_rows=32",
         "--config.data.eval.max_rows=8", "--config.report.gen_prompts=0")
ONE_STAGE = ("--config.stage_order=all",)  # smoke: one train step program to compile, not two


def cli(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, "--config=configs/two_stage.py", *args]


def base(root: Path) -> tuple[Path, tuple[str, ...]]:
  """(directory of the cache and zero-shot student, extra config flags): the demo's, or for
  --smoke a small one built here. Built outside the timings (the first sweep would otherwise
  build them inside its own)."""
  if not F.smoke:
    if not (DEMO / "student_init" / "config.json").exists():
      sys.exit(f"{DEMO} has no cache and student yet: run the demo first "
               "(python -m moedistill.train --config=configs/two_stage.py)")
    return DEMO, ()
  d = root / "base"
  for cmd in (cli("moedistill.cache_logits", f"--config.workdir={d}", *SMALL),
              cli("moedistill.compress", f"--config.workdir={d}", *SMALL)):
    subprocess.run(cmd, cwd=common.REPO, check=True, stdout=subprocess.DEVNULL)
  return d, SMALL + ONE_STAGE


def run_mode(mode: str, alphas: list[str], root: Path, src: Path, extra: tuple[str, ...]):
  """(wall seconds, peak RSS GiB, {point: result}) of one sweep command."""
  workdir = root / mode
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = cli("moedistill.sweep", f"--config.workdir={workdir}",
            f"--config.cache.path={src / 'cache'}",
            f"--config.student.init_from={src / 'student_init'}",
            f"--config.stages.wrappers.steps={F.steps}", f"--config.stages.all.steps={F.steps}",
            f"--config.train.batch_size={F.batch}", f"--sweep.alpha={','.join(alphas)}",
            f"--sweep.batched={mode}", *extra)
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], cwd=common.REPO,
                       capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if out.returncode:
    sys.exit(f"{mode}: exit {out.returncode}\n{out.stderr[-3000:]}")
  report = json.loads((workdir / "sweep" / "report.json").read_text())
  return wall, int(out.stdout.split()[-1]) / 2**20, {r["point"]: r for r in report["points"]}


def main(argv):
  del argv
  if F.smoke:  # the batched mode only: the sequential one is the plain train path, run by tests
    F.points, F.steps, F.batch, F.modes = 2, 2, 4, ["on"]
  stages = 1 if F.smoke else 2
  alphas = [f"{0.3 + 0.6 * i / max(F.points - 1, 1):.2f}" for i in range(F.points)]
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) if F.smoke else common.REPO / "runs" / "bench_sweep"
    src, extra = base(Path(tmp))
    runs = {m: run_mode(m, alphas, root, src, extra) for m in F.modes}
  print(f"points={F.points} (alpha {','.join(alphas)}) steps={F.steps} x {stages} stages "
        f"batch={F.batch} rows")
  res = {"points": F.points, "alphas": alphas, "steps": F.steps, "stages": stages,
         "batch": F.batch, "modes": {}}
  for m, (wall, rss, _) in runs.items():
    res["modes"][m] = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2),
                       "point_steps_per_s": round(F.points * stages * F.steps / wall, 2)}
    print(f"sweep --sweep.batched={m:<4} {wall:7.1f} s  "
          f"{F.points * stages * F.steps / wall:6.2f} point-steps/s  peak RSS {rss:.2f} GiB")
  if {"off", "on"} <= set(runs):
    (seq, _, p_seq), (bat, _, p_bat) = runs["off"], runs["on"]
    res["batched_speed_over_sequential"] = round(seq / bat, 2)
    res["largest_relative_difference"] = {
        key: max(abs(p_bat[n][key] - p_seq[n][key]) / abs(p_seq[n][key]) for n in p_seq)
        for key in ("kl", "ppl", "ce")}
    print(f"batched / sequential speed: {seq / bat:.2f}x")
    for key, rel in res["largest_relative_difference"].items():
      print(f"largest relative difference of a point's held-out {key}: {rel:.2e}")
  common.emit("sweep", res, F.out)


if __name__ == "__main__":
  app.run(main)
