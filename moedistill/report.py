"""The before/after report: teacher, zero-shot student and distilled student on held-out rows,
as a table, <workdir>/report.json and a PNG of the loss curves per stage.

CLI: python -m moedistill.report --config=configs/two_stage.py [--config.<field>=<value>]
evaluates the three again (the teacher, `student.init_from`, `<workdir>/export`, on the eval
cache) and rewrites both files; `train` does this at its end.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax

from moedistill import atomic_io, sharding
from moedistill.config import Job
from moedistill.data.cache import CacheReader
from moedistill.training import gen_eval
from moedistill.training.held_out import evaluate_model
from moedistill.hub import hf
from moedistill.model import resolve

ROWS = (("teacher", "teacher"), ("student_init", "zero-shot student"),
        ("student_distilled", "distilled student"))


def evaluate_path(job: Job, path, reader: CacheReader, mesh=None, teacher=None,
                  model=None) -> dict:
  """Held-out figures of one checkpoint directory, at T=1 when cached (the report's and the
  sweep's one definition). The model is read straight into its shardings on `mesh` (default:
  the config's) and evaluated there: every process must call this; `model`, when given, is
  that checkpoint already loaded so. With `teacher` (a model on that mesh) the figures add the
  exact full-vocab KL `kl_full` (evaluate_model)."""
  mesh = mesh or sharding.make_mesh(job.mesh)
  temperature = 1.0 if reader.temperature_index(1.0) is not None else reader.meta["temperatures"][0]
  # Exact figures even when training trades drops for speed (capacity): evaluate_model
  # refuses a dropping Runtime, so the report evaluates with its dropless counterpart.
  if model is None:
    model, _ = hf.load_model(path, resolve.dropless(job.model), put=sharding.sharded_put(mesh))
  return evaluate_model(model, reader, temperature=temperature, mesh=mesh, teacher=teacher,
                        vocab_chunk=job.train.vocab_chunk)


def write_report(job: Job, mesh=None) -> dict:
  """Every process evaluates (on the mesh); process 0 prints and writes the files. The
  teacher is loaded once beside each evaluated model for the exact full-vocab KL column
  (the teacher's own row is 0 by definition, up to float32 rounding)."""
  workdir = Path(job.workdir)
  reader = CacheReader(job.cache_path("eval"))
  mesh = mesh or sharding.make_mesh(job.mesh)
  paths = {"teacher": job.teacher, "student_init": job.student_init,
           "student_distilled": workdir / "export"}
  teacher = hf.load_model(job.teacher, resolve.dropless(job.model),
                          put=sharding.sharded_put(mesh))[0]
  report = {key: evaluate_path(job, path, reader, mesh, teacher,
                              model=teacher if key == "teacher" else None)
            for key, path in paths.items()}
  del teacher
  # Greedy exact match on held-out prompts of the demo corpus's tasks (gen_eval; {} when
  # config.report.gen_prompts=0 or the teacher is not the demo's).
  for key, figures in gen_eval.report_figures(job, paths, mesh).items():
    report[key]["gen_exact_match"] = figures
  if jax.process_index() != 0:
    return report
  print(f"{'held-out':<20} {'ppl':>9} {'KL to teacher':>14} {'KL (full vocab)':>16} "
        f"{'top-1 agree':>12}")
  for key, name in ROWS:
    r = report[key]
    print(f"{name:<20} {r['ppl']:>9.3f} {r['kl']:>14.4f} {r['kl_full']:>16.4f} "
          f"{r['top1_agreement']:>12.3f}")
  gen_eval.print_table(report, ROWS)
  atomic_io.write_json(workdir / "report.json", report)
  plot_losses(workdir)
  return report


def plot_losses(workdir: Path):
  # matplotlib keeps its font cache in MPLCONFIGDIR, else under the home directory. A user's
  # setting wins; otherwise one directory per user in the temp directory (kept between runs,
  # so the cache is built once): a run writes only its workdir, its cache and temporary
  # files (tests/commands/test_safety.py), and the workdir holds only the run's own outputs.
  if "MPLCONFIGDIR" not in os.environ:
    d = Path(tempfile.gettempdir(), f"moedistill-matplotlib-{os.getuid()}")
    try:
      d.mkdir(mode=0o700, exist_ok=True)
      os.environ["MPLCONFIGDIR"] = str(d)
    except OSError:  # no writable temp directory: matplotlib's own fallback, with its warning
      pass
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  f = workdir / "metrics.jsonl"
  if not f.exists():
    return
  rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
  fig, ax = plt.subplots(figsize=(7, 4))
  for stage in dict.fromkeys(r["stage"] for r in rows):
    pts = sorted({r["global_step"]: r for r in rows if r["stage"] == stage}.values(),
                 key=lambda r: r["global_step"])
    for key, style in (("loss", "-"), ("kl", "--")):
      ax.plot([r["global_step"] for r in pts], [r[key] for r in pts], style,
              label=f"{stage} {key}")
  ax.set_xlabel("global step")
  ax.set_ylabel("train loss / KL")
  ax.set_yscale("log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "loss_curves.png", dpi=100)
  plt.close(fig)


def main(argv):
  from moedistill.cli import load_job
  job, _ = load_job(argv)
  write_report(job)


if __name__ == "__main__":
  from moedistill.cli import run
  run(main)
