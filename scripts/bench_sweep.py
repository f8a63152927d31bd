"""Benchmark: sweep points trained one at a time against all points in one vmapped program.

  python scripts/bench_sweep.py [--points=4] [--steps=40] [--batch=16]

On the embedded tiny teacher (its cache and zero-shot student under runs/two_stage, built if
missing), stage `all`, points differing in alpha (the axis a batched program can share: one
k and one stage plan). Prints, for sequential and vmapped, compile seconds, run seconds and
steps/s summed over points, and the ratio. The sweep itself runs points one at a time (the
`train` code path, bit-identical to a plain run); batching only pays where this ratio says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moedistill import sharding, train  # noqa: E402
from moedistill.data.cache import CacheReader  # noqa: E402
from moedistill.training.train_step import BATCH_KEYS, make_train_step  # noqa: E402
from moedistill.training.trainer import Trainer  # noqa: E402


def setup(batch: int):
  from ml_collections import config_flags  # noqa: F401 (config file loader below)
  import importlib.util
  spec = importlib.util.spec_from_file_location("two_stage", "configs/two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.batch_size = batch
  from moedistill.config import job_from_config
  job = job_from_config(c)
  mesh = train.preflight(job)
  train.ensure_caches(job, mesh)
  init = train.ensure_student(job, mesh)
  reader = CacheReader(job.cache_path("train"))
  return Trainer(job, train.load(job, init, mesh), reader, mesh, progress=False), mesh


def timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--points", type=int, default=4)
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--batch", type=int, default=16)
  a = ap.parse_args()
  tr, mesh = setup(a.batch)
  i = [s.name for s in tr.job.train.stages].index("all")
  stage, tx, paths, _ = tr._stage_setup(i)
  trainable, frozen = tr._split(paths)
  sc = tr._step_config(stage)
  alphas = jnp.linspace(0.3, 0.9, a.points)
  batches = [{k: sharding.global_batch(mesh, v[k]) for k in BATCH_KEYS}
             for v in (tr._batch(s) for s in range(a.steps))]

  # Sequential: one compiled program per point (alpha is static in the train step).
  seq_compile = seq_run = 0.0
  for alpha in alphas:
    step = jax.jit(make_train_step(tr.graphdef, tr.template, tx,
                                   dataclasses.replace(sc, alpha=float(alpha))))
    p, o = trainable, tx.init(trainable)
    (p, o, _), dt = timed(step, p, frozen, o, batches[0])
    seq_compile += dt
    t0 = time.perf_counter()
    for b in batches[1:]:
      p, o, _ = step(p, frozen, o, b)
    jax.block_until_ready(p)
    seq_run += time.perf_counter() - t0

  # Batched: every point in one program, alpha a vmapped argument.
  def one(p, o, alpha, batch):
    return make_train_step(tr.graphdef, tr.template, tx,
                           dataclasses.replace(sc, alpha=alpha))(p, frozen, o, batch)
  vstep = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))
  stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * a.points), t)  # noqa: E731
  p, o = stack(trainable), stack(tx.init(trainable))
  (p, o, _), vec_compile = timed(vstep, p, o, alphas, batches[0])
  t0 = time.perf_counter()
  for b in batches[1:]:
    p, o, _ = vstep(p, o, alphas, b)
  jax.block_until_ready(p)
  vec_run = time.perf_counter() - t0

  n = a.points * (a.steps - 1)
  print(f"points={a.points} steps={a.steps} batch={a.batch} rows x {tr.reader.meta['seq_len']}")
  print(f"sequential: compile {seq_compile:6.2f}s  run {seq_run:6.2f}s  {n / seq_run:7.1f} "
        "point-steps/s")
  print(f"vmapped:    compile {vec_compile:6.2f}s  run {vec_run:6.2f}s  {n / vec_run:7.1f} "
        "point-steps/s")
  print(f"vmapped / sequential speed: run {seq_run / vec_run:.2f}x, with compile "
        f"{(seq_compile + seq_run) / (vec_compile + vec_run):.2f}x")


if __name__ == "__main__":
  main()
