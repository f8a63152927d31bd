"""Distill a compressed student from cached teacher logits, end to end.

CLI: python -m moedistill.train --config=configs/two_stage.py [--config.<field>=<value>]
Builds what is missing (teacher caches, the zero-shot student), resumes from the newest
checkpoint in <workdir>/checkpoints, runs the remaining stages, exports the student to
<workdir>/export (Hugging Face format), evaluates teacher / zero-shot / distilled student on
the held-out cache and writes <workdir>/report.json and <workdir>/loss_curves.png.
SIGTERM: saves a checkpoint and exits 0; rerun the same command to continue.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

from moedistill import cache, compress, hf, sharding
from moedistill.cache_logits import build_cache, finished
from moedistill.config import Job
from moedistill.errors import UserError
from moedistill.model.shared_core import Compression
from moedistill.trainer import Preempted, Trainer


def load(job: Job, path, mesh):
  m = job.model
  return hf.load_model(path, dtype=m.dtype, param_dtype=m.param_dtype,
                       moe_backend=m.moe_backend, capacity_factor=m.capacity_factor,
                       remat=m.remat, attention=m.attention, attention_block=m.attention_block,
                       put=sharding.sharded_put(mesh))[0]


def ensure_caches(job: Job, mesh):
  teacher = None
  for split in ("train", "eval"):
    if not finished(job, split):
      if teacher is None:
        teacher = load(job, job.teacher, mesh)
      build_cache(job, split, mesh=mesh, teacher=teacher, checked=True)


def ensure_student(job: Job):
  """The zero-shot student ("checkpoint-0"): compress the teacher if init_from is missing."""
  path = Path(job.student_init)
  if (path / "config.json").exists():
    return path
  if jax.process_index() == 0:
    print(f"building the zero-shot student at {path} (ranks {job.ranks})")
    teacher, _ = hf.load_model(job.teacher, param_dtype=job.model.param_dtype)
    student, report = compress.compress_model(teacher, Compression(*job.ranks))
    compress.print_report(report, compress.param_count(teacher), compress.param_count(student))
    hf.save_model(student, path, tokenizer_from=job.teacher)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("student init written")
  return path


def check_against_cache(job: Job, reader: cache.CacheReader, cfg):
  reader.validate(vocab_size=cfg.vocab_size, seq_len=job.train_data.seq_len)
  for st in job.train.stages:
    reader.validate(vocab_size=cfg.vocab_size, seq_len=job.train_data.seq_len,
                    temperature=st.temperature, mode=job.train.kd_mode)
  if job.train.batch_size % (jax.process_count()):
    raise UserError(f"config.train.batch_size={job.train.batch_size}: not divisible by "
                    f"{jax.process_count()} processes")


def preflight(job: Job):
  """Every check that needs no weights and no cache, before any slow work starts."""
  from moedistill import optim, param_tree as P
  from moedistill.model.config import ModelConfig
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  shapes = P.shapes(P.abstract_student(cfg, Compression(*job.ranks)))
  for st in job.train.stages:
    optim.build(st, job.train, shapes, 1)  # regexes, coverage, all-frozen
    if job.train.kd_mode == "bucket" and st.temperature not in job.cache.temperatures:
      raise UserError(f"config.stages.{st.name}.temperature={st.temperature} is not among "
                      f"config.cache.temperatures={list(job.cache.temperatures)}; bucket mode "
                      "needs the teacher's full-vocab logsumexp at that temperature")
  mesh = sharding.make_mesh(job.mesh)
  div = sharding.batch_divisor(mesh)
  if (job.train.batch_size // job.train.micro_batches) % div:
    raise UserError(f"config.train.batch_size={job.train.batch_size} / micro_batches="
                    f"{job.train.micro_batches} is not divisible by the mesh's {div} batch "
                    "shards (data x fsdp x expert)")
  return mesh


def train(job: Job, *, progress: bool = True):
  """Everything but the report; returns the export directory."""
  mesh = preflight(job)
  workdir = Path(job.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ensure_caches(job, mesh)
  init = ensure_student(job)
  reader = cache.CacheReader(job.cache_path("train"))
  student = load(job, init, mesh)
  check_against_cache(job, reader, student.config)
  trainer = Trainer(job, student, reader, mesh, progress=progress)
  params = {k: sharding.to_host(v) for k, v in trainer.run().items()}  # all processes
  export = workdir / "export"
  if jax.process_index() == 0:
    from moedistill import param_tree as P
    final = P.merge(trainer.graphdef, trainer.template, params)
    hf.save_model(final, export, merged=True, tokenizer_from=job.teacher)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("export written")
  return export


def main(argv):
  from moedistill.cli import load_job
  from moedistill.report import write_report
  job, _ = load_job(argv)
  t0 = time.time()
  try:
    export = train(job)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  if jax.process_index() == 0:
    report = write_report(job)
    print(json.dumps(report, indent=2))
    print(f"done in {time.time() - t0:.0f}s: export {export}, report "
          f"{Path(job.workdir) / 'report.json'}")


if __name__ == "__main__":
  from moedistill.cli import run
  run(main)
