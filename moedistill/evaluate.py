"""Evaluate a checkpoint (HF or native) against a cache's rows: perplexity, KL to the teacher
(bucket mode), top-1 agreement with the teacher; with --full_vocab also the exact full-vocab
KL(teacher || checkpoint) (`kl_full`, the teacher loaded beside it on the same mesh) and the
teacher's mean mass inside the cache's top-k (`teacher_topk_mass`).

CLI: python -m moedistill.evaluate --checkpoint=DIR --cache=PATH [--temperature=1.0]
     [--batch_size=8] [--max_rows=0] [--full_vocab [--teacher=DIR]]
     python -m moedistill.evaluate --config=configs/two_stage.py  (<workdir>/export on the
     eval cache, with the config's dtypes)
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

from moedistill import sharding
from moedistill.cli import load_job, pick, run
from moedistill.data.cache import CacheReader
from moedistill.errors import UserError
from moedistill.hub import hf
from moedistill.model.layers import Runtime
from moedistill.training.held_out import evaluate_model


def define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "HF or native checkpoint directory "
                      "(default: <config.workdir>/export, the distilled student)")
  flags.DEFINE_string("cache", None, "cache path (default: the config's eval cache)")
  flags.DEFINE_float("temperature", 1.0, "a temperature the cache holds")
  flags.DEFINE_integer("batch_size", 8, "rows per forward")
  flags.DEFINE_integer("max_rows", 0, "evaluate the first N rows (0 = all)")
  flags.DEFINE_bool("full_vocab", False, "also the exact full-vocab KL(teacher || checkpoint) "
                    "at --temperature (kl_full) and the teacher's top-k mass in the cache")
  flags.DEFINE_string("teacher", None, "teacher checkpoint for --full_vocab (default: the "
                      "config's teacher)")


def main(argv):
  job, F = load_job(argv, required=False)
  checkpoint = pick(F.checkpoint, "checkpoint", job and str(Path(job.workdir, "export")))
  cache = pick(F.cache, "cache", job and job.cache_path("eval"))
  if F.teacher is not None and not F.full_vocab:
    raise UserError(f"--teacher={F.teacher}: read only with --full_vocab")
  teacher_dir = pick(F.teacher, "teacher", job and job.teacher) if F.full_vocab else None
  mesh = sharding.make_mesh(job.mesh if job else sharding.MeshConfig())
  # The config's compute settings, as train's report uses.
  model, _ = hf.load_model(checkpoint, job.model if job else Runtime(),
                           put=sharding.sharded_put(mesh))
  teacher = None
  if F.full_vocab:
    teacher = hf.load_model(teacher_dir, job.model if job else Runtime(),
                            put=sharding.sharded_put(mesh))[0]
  out = evaluate_model(model, CacheReader(cache), temperature=F.temperature,
                       batch_size=F.batch_size, max_rows=F.max_rows, mesh=mesh,
                       teacher=teacher, vocab_chunk=job.train.vocab_chunk if job else 4096)
  if jax.process_index() == 0:
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
  run(main, extra_flags=(define_flags,))
