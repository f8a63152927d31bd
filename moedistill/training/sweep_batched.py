"""A batched sweep: points that differ only in alpha train together as one program.

Legend: p points of a group.
A group's params and optimizer states are stacked on a leading points axis and the plain
train step (train_step.make_train_step) is vmapped over it, alpha a per-point argument, every
point fed the same batches. Everything else is the Trainer's: stage loop, loader, logging,
Orbax checkpoints (the stacked state, in the group's workdir), exact resume, SIGTERM.
Temperature stays a group setting: the fused vocab statistics take it as a static argument.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from typing_extensions import override

from moedistill import atomic_io, sharding
from moedistill.config import Job
from moedistill.training import param_tree as P
from moedistill.training.train_step import make_train_step
from moedistill.training.trainer import Trainer


def group_key(job: Job) -> str:
  """Jobs with the same key can share one program: all but the workdir and the alphas."""
  stages = tuple(dataclasses.replace(s, alpha=0.0) for s in job.train.stages)
  return repr(dataclasses.replace(job, workdir="", train=dataclasses.replace(
      job.train, stages=stages)))


def group_name(names: list[str]) -> str:
  digest = hashlib.sha1(json.dumps(sorted(names)).encode()).hexdigest()[:10]
  return f"_group_{digest}"


class BatchedTrainer(Trainer):
  """The Trainer over a stack of `len(names)` students; `alphas_ps[j, i]`: point j's alpha
  in stage i."""

  def __init__(self, job: Job, model, reader, mesh, names: list[str], alphas_ps, *,
               progress: bool = True):
    self.names, self.alphas_ps = list(names), np.asarray(alphas_ps, np.float32)
    # One sharding for every input and output, so the step compiles once per stage.
    self.rep = sharding.replicated(mesh)
    super().__init__(job, model, reader, mesh, progress=progress)

  @override
  def _place_params(self, params: dict) -> dict:
    """Each param stacked once per point, replicated."""
    n = len(self.names)
    return jax.device_put({k: jnp.stack([v] * n) for k, v in params.items()}, self.rep)

  @override
  def _init_opt(self, tx, trainable):
    return jax.jit(jax.vmap(tx.init), out_shardings=self.rep)(trainable)

  @override
  def _compile_step(self, stage, tx, trainable, opt_state):
    sc = self._step_config(stage)

    def one(tr, fr, opt, alpha, batch):
      step = make_train_step(self.graphdef, self.template, tx,
                             dataclasses.replace(sc, alpha=alpha))
      return step(tr, fr, opt, batch)

    vstep = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 2),
                    out_shardings=self.rep)
    alphas_p = jax.device_put(self.alphas_ps[:, self.job.train.stages.index(stage)],
                              self.rep)
    return lambda tr, fr, opt, batch: vstep(tr, fr, opt, alphas_p, batch)

  @override
  def _host_metrics(self, m) -> dict:
    """Means over the points (a non-finite point makes the mean non-finite, so the
    Trainer stops on it), and every point's own metrics under "points"."""
    m = jax.device_get(m)
    row = {k: float(np.mean(v)) for k, v in m.items()}
    row["points"] = {name: {k: float(v[j]) for k, v in m.items()}
                     for j, name in enumerate(self.names)}
    return row

  def point_model(self, stacked: dict, j: int):
    return P.merge(self.graphdef, self.template, {k: v[j] for k, v in stacked.items()})


def split_metrics(group_dir: Path, name: str, point_dir: Path):
  """The group's metrics.jsonl rows as point `name`'s own metrics.jsonl."""
  rows = []
  for line in (group_dir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    own = r.pop("points")[name]
    rows.append(json.dumps({**r, **own}))
  atomic_io.write_text(point_dir / "metrics.jsonl", "".join(x + "\n" for x in rows))


def train_group(jobs: list[Job], names: list[str], group_dir: Path, mesh, *,
                progress: bool = True):
  """Trains (or resumes) the group; returns (trainer, stacked final params)."""
  from moedistill import train
  from moedistill.data.cache import CacheReader
  gjob = dataclasses.replace(jobs[0], workdir=str(group_dir))
  group_dir.mkdir(parents=True, exist_ok=True)
  atomic_io.write_json(group_dir / "members.json", names, indent=None)
  reader = CacheReader(gjob.cache_path("train"))
  student = train.load(gjob, gjob.student_init, mesh)
  train.check_against_cache(gjob, reader, student.config)
  alphas_ps = [[s.alpha for s in j.train.stages] for j in jobs]
  if jax.process_index() == 0:  # the stage tables below show the first point's alpha
    print("alpha per point (by stage): " + ", ".join(
        f"{n}: {'/'.join(f'{a:g}' for a in row)}" for n, row in zip(names, alphas_ps)))
  trainer = BatchedTrainer(gjob, student, reader, mesh, names, alphas_ps, progress=progress)
  return trainer, trainer.run()
