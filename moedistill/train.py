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

from moedistill import compress, sharding
from moedistill.cache_logits import build_cache, finished
from moedistill.config import Job
from moedistill.data import cache
from moedistill.errors import UserError
from moedistill.hub import hf
from moedistill.model.shared_core import Compression
from moedistill.training.trainer import Preempted, Trainer


def load(job: Job, path, mesh):
  return hf.load_model(path, job.model, put=sharding.sharded_put(mesh))[0]


def ensure_caches(job: Job, mesh):
  teacher = None
  for split in ("train", "eval"):
    if not finished(job, split):
      if teacher is None:
        teacher = load(job, job.teacher, mesh)
      build_cache(job, split, mesh=mesh, teacher=teacher, checked=True)


def ensure_student(job: Job, mesh):
  """The zero-shot student ("checkpoint-0"): compress the teacher if init_from is missing.
  Every process takes part: the teacher is read straight into its shardings on the mesh and
  compressed there; save_model gathers one param at a time and process 0 writes."""
  path = Path(job.student_init)
  if (path / "config.json").exists():
    check_student_init(job, path)
    return path
  first = jax.process_index() == 0
  if first:
    print(f"building the zero-shot student at {path} (ranks {job.ranks})")
  teacher = load(job, job.teacher, mesh)
  student, report = compress.compress_model(teacher, Compression(*job.ranks), mesh=mesh)
  if first:
    compress.print_report(report, compress.param_count(teacher), compress.param_count(student))
  del teacher
  hf.save_model(student, path, tokenizer_from=job.teacher, extra_files={
      "compression_report.json": compress.report_json(Compression(*job.ranks), report,
                                                      job.teacher)})
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("student init written")
  return path


def check_student_init(job: Job, path: Path):
  """Refuses a zero-shot student made with other ranks or from another teacher than the
  config's, naming the field: its config.json records the ranks and core, its
  compression_report.json (when moedistill made it) the teacher's hash."""
  from moedistill.cache_logits import teacher_hash
  from moedistill.model.shared_core import PROJS
  made = json.loads((path / "config.json").read_text()).get("compression")
  again = (f"delete {path} to build it again, or point student.init_from at a student made "
           "with this config")
  if made is not None:
    for q, want in zip(PROJS, job.ranks):
      if int(made.get(f"rank_{q}", want)) != want:
        field = "student.rank" if len(set(job.ranks)) == 1 else f"student.rank_{q}"
        raise UserError(f"{field}={want}: the zero-shot student at {path} was made with "
                        f"rank_{q}={made[f'rank_{q}']}; {again}")
  report = path / "compression_report.json"
  old = json.loads(report.read_text()).get("teacher_hash") if report.exists() else None
  if old is not None and old != teacher_hash(job.teacher):
    raise UserError(f"teacher={job.teacher}: the zero-shot student at {path} was made from a "
                    f"teacher with other contents (teacher_hash {old}, now "
                    f"{teacher_hash(job.teacher)}); {again}")


def plan_check(job: Job, mesh, device_memory: int | None = None):
  """`moedistill.plan`'s check on this run's real mesh, over the programs still to run,
  before any weight is read. Without `device_memory` it runs on accelerators only (their own
  limit): on CPU the devices share host memory and the compiles would double the demo's
  start-up."""
  from moedistill import plan
  if device_memory is None:
    if jax.default_backend() == "cpu":
      return
    device_memory = plan.device_memory(jax.devices())
  which = [name for name, todo in (
      ("cache_forward", not all(finished(job, s) for s in ("train", "eval"))),
      ("compress", not (Path(job.student_init) / "config.json").exists()),
      ("train", True), ("eval", True), ("export", True)) if todo]
  plan.plan(job, mesh, device_memory, which, show=False, fail_fast=True)


def kd_target(job: Job) -> str:
  """What the KD term reads: the cache's kd_mode, or `online` (the teacher in the step needs
  no cached logsumexp at the stage temperatures)."""
  return "online" if job.train.teacher_mode == "online" else job.train.kd_mode


def online_teacher(job: Job, student_cfg, mesh):
  """teacher_mode=online: the teacher on the student's mesh (its params an input of every
  train step, frozen); else None."""
  from moedistill.training.trainer import needs_teacher
  if not needs_teacher(job):  # also loaded for on-policy stages (they score online)
    return None
  teacher = load(job, job.teacher, mesh)
  if teacher.config.vocab_size != student_cfg.vocab_size:
    raise UserError(f"config.train.teacher_mode={job.train.teacher_mode!r}: the teacher's "
                    f"vocab_size="
                    f"{teacher.config.vocab_size}, the student's {student_cfg.vocab_size}")
  return teacher


def check_against_cache(job: Job, reader: cache.CacheReader, cfg):
  reader.validate(vocab_size=cfg.vocab_size, seq_len=job.train_data.seq_len)
  for st in job.train.stages:
    reader.validate(vocab_size=cfg.vocab_size, seq_len=job.train_data.seq_len,
                    temperature=st.temperature, mode=kd_target(job))
  if job.train.batch_size % (jax.process_count()):
    raise UserError(f"config.train.batch_size={job.train.batch_size}: not divisible by "
                    f"{jax.process_count()} processes")


def preflight(job: Job):
  """Every check that needs no weights and no cache, before any slow work starts."""
  from moedistill.model.config import ModelConfig
  from moedistill.training import optim, param_tree as P
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  shapes = P.shapes(P.abstract_student(cfg, Compression(*job.ranks)))
  for st in job.train.stages:
    optim.build(st, job.train, shapes, 1)  # regexes, coverage, all-frozen
    if kd_target(job) == "bucket" and st.temperature not in job.cache.temperatures:
      raise UserError(f"{st.field('temperature')}={st.temperature} is not among "
                      f"config.cache.temperatures={list(job.cache.temperatures)}; bucket mode "
                      "needs the teacher's full-vocab logsumexp at that temperature")
  mesh = sharding.make_mesh(job.mesh)
  sharding.check_model_fits_mesh(cfg, mesh)
  div = sharding.batch_divisor(mesh)
  if (job.train.batch_size // job.train.micro_batches) % div:
    raise UserError(f"config.train.batch_size={job.train.batch_size} / micro_batches="
                    f"{job.train.micro_batches} is not divisible by the mesh's {div} batch "
                    "shards (data x fsdp x expert)")
  return mesh


def train(job: Job, *, progress: bool = True, device_memory: int | None = None):
  """Everything but the report; returns the export directory. `device_memory`: bytes per
  device every program must fit (see plan_check)."""
  mesh = preflight(job)
  plan_check(job, mesh, device_memory)
  workdir = Path(job.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ensure_caches(job, mesh)
  init = ensure_student(job, mesh)
  reader = cache.CacheReader(job.cache_path("train"))
  student = load(job, init, mesh)
  teacher = online_teacher(job, student.config, mesh)
  check_against_cache(job, reader, student.config)
  trainer = Trainer(job, student, reader, mesh, progress=progress, teacher=teacher)
  from moedistill.training import param_tree as P
  return save_export(job, P.merge(trainer.graphdef, trainer.template, trainer.run()))


def save_export(job: Job, model) -> Path:
  """The trained student in Hugging Face format at <workdir>/export. Every process:
  save_model gathers one param at a time (streamed), process 0 writes."""
  export = Path(job.workdir) / "export"
  hf.save_model(model, export, merged=True, dtype=hf.checkpoint_dtype(job.teacher),
                tokenizer_from=job.teacher)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("export written")
  return export


def main(argv):
  from moedistill.cli import load_job
  from moedistill.plan import parse_bytes
  from moedistill.report import write_report
  job, flags = load_job(argv)
  t0 = time.time()
  memory = None if flags.device_memory is None else parse_bytes(flags.device_memory)
  try:
    export = train(job, device_memory=memory)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  if jax.process_index() == 0:  # before the table, so that stdout ends with it
    then = (f"evaluating for the report {Path(job.workdir) / 'report.json'}"
            if job.report_after_train else "no report (config.report.after_train=False; "
            "`python -m moedistill.report` with this config writes it)")
    print(f"trained in {time.time() - t0:.0f}s: export {export}; {then}", flush=True)
  if job.report_after_train:
    write_report(job)  # every process: the models are evaluated on the mesh


def define_flags():
  from absl import flags
  flags.DEFINE_string("device_memory", None, "before any slow work, check (moedistill.plan) "
                      "that every program fits this many bytes per device, e.g. 80GiB "
                      "(default: the accelerators' own limit; no check on CPU)")


if __name__ == "__main__":
  from moedistill.cli import run
  run(main, extra_flags=(define_flags,))
