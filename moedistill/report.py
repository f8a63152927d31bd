"""The before/after report: teacher, zero-shot student and distilled student on held-out rows,
as a table, <workdir>/report.json and a PNG of the loss curves per stage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from moedistill import sharding
from moedistill.config import Job
from moedistill.data.cache import CacheReader
from moedistill.training.held_out import evaluate_model
from moedistill.hub import hf

ROWS = (("teacher", "teacher"), ("student_init", "zero-shot student"),
        ("student_distilled", "distilled student"))


def evaluate_path(job: Job, path, reader: CacheReader, mesh=None) -> dict:
  """Held-out figures of one checkpoint directory, at T=1 when cached (the report's and the
  sweep's one definition). The model is read straight into its shardings on `mesh` (default:
  the config's) and evaluated there: every process must call this."""
  mesh = mesh or sharding.make_mesh(job.mesh)
  temperature = 1.0 if reader.temperature_index(1.0) is not None else reader.meta["temperatures"][0]
  model, _ = hf.load_model(path, job.model, put=sharding.sharded_put(mesh))
  return evaluate_model(model, reader, temperature=temperature, mesh=mesh)


def write_report(job: Job, mesh=None) -> dict:
  """Every process evaluates (on the mesh); process 0 prints and writes the files."""
  workdir = Path(job.workdir)
  reader = CacheReader(job.cache_path("eval"))
  paths = {"teacher": job.teacher, "student_init": job.student_init,
           "student_distilled": workdir / "export"}
  report = {key: evaluate_path(job, path, reader, mesh) for key, path in paths.items()}
  if jax.process_index() != 0:
    return report
  print(f"{'held-out':<20} {'ppl':>9} {'KL to teacher':>14} {'top-1 agree':>12}")
  for key, name in ROWS:
    r = report[key]
    print(f"{name:<20} {r['ppl']:>9.3f} {r['kl']:>14.4f} {r['top1_agreement']:>12.3f}")
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  plot_losses(workdir)
  return report


def plot_losses(workdir: Path):
  # matplotlib caches fonts under ~/.cache unless told otherwise: keep writes in the workdir.
  os.environ.setdefault("MPLCONFIGDIR", str(workdir / ".matplotlib"))
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
