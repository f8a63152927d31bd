"""The stage loop: optimizer per stage, sharded jitted steps, prefetch, logging, checkpoints,
exact resume, SIGTERM and non-finite-loss handling.

SIGTERM (preemption): every process saves the same step, then `Preempted` is raised. With
several processes JAX's preemption service (it owns SIGTERM once `jax.distributed` is up)
agrees on that step; a single process uses its own handler.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from moedistill import atomic_io, sharding
from moedistill.config import Job, Stage
from moedistill.data.cache import CacheReader
from moedistill.data.loader import Loader
from moedistill.errors import UserError
from moedistill.training import optim, param_tree as P
from moedistill.training.checkpoint import Checkpoints, abstract_like, restore_params
from moedistill.training.train_step import BATCH_KEYS, StepConfig, make_train_step


def stage_steps(stage: Stage, rows: int, batch_size: int) -> int:
  return stage.steps or max(1, math.ceil(stage.epochs * rows / batch_size))


def jit_train_step(graphdef, template, tx, sc: StepConfig, trainable, opt_state, mesh,
                   teacher_def=None):
  """The jitted train step (also what `moedistill.plan` compiles with abstract inputs):
  params and optimizer state keep their shardings and are donated. Online teacher
  (`teacher_def` = its graphdef and template): the step takes the teacher's params, on the
  same mesh, as a fifth argument, neither donated nor differentiated."""
  shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
  return jax.jit(sharding.on_mesh(mesh, make_train_step(graphdef, template, tx, sc,
                                                        teacher_def)),
                 donate_argnums=(0, 2),
                 out_shardings=(shard_of(trainable), shard_of(opt_state),
                                sharding.replicated(mesh)))


def step_config(job: Job, stage: Stage, cfg, t_index: int | None) -> StepConfig:
  """A stage's step settings (`t_index`: the cached lse column of its temperature)."""
  tc = job.train
  return StepConfig(alpha=stage.alpha, temperature=stage.temperature, mode=tc.kd_mode,
                    t_index=t_index, vocab_chunk=tc.vocab_chunk, micro_batches=tc.micro_batches,
                    aux_coef=cfg.router_aux_loss_coef, top_k=cfg.num_experts_per_tok, k=tc.k,
                    online=tc.teacher_mode == "online")


def needs_teacher(job: Job) -> bool:
  """The teacher runs beside the student: teacher_mode=online, or an on-policy stage (its
  samples are scored online; training/on_policy.py)."""
  return (job.train.teacher_mode == "online"
          or any(s.kind == "on_policy" for s in job.train.stages))


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was written."""


def truncate_metrics(path: Path, global_step: int):
  """Keeps the rows of metrics.jsonl up to `global_step` (where a resumed run continues:
  later rows of a killed run are logged again) and drops a partly written last line."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a kill
    if row.get("global_step", 0) <= global_step:
      keep.append(line)
  atomic_io.write_text(path, "".join(x + "\n" for x in keep))


class Logger:
  def __init__(self, workdir: Path, enabled: bool, global_step: int = 0):
    """Appends to metrics.jsonl after the rows up to `global_step` (the resumed step)."""
    self.enabled = enabled
    if enabled:
      truncate_metrics(workdir / "metrics.jsonl", global_step)
    self.file = open(workdir / "metrics.jsonl", "a") if enabled else None
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def log(self, row: dict):
    if not self.enabled:
      return
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    for k, v in row.items():
      if isinstance(v, float):
        self.tb.add_scalar(f"{row['stage']}/{k}", v, row["global_step"])

  def close(self):
    if self.enabled:
      self.file.close()
      self.tb.close()


def read_lanes(configured: int, stored: int | None, process_count: int) -> int:
  """The run's read lanes (the batch order depends on them): the config's, else those its
  checkpoints were made with, else the process count of its first start."""
  if configured and stored and configured != stored and jax.process_index() == 0:
    print(f"cache.read_lanes={configured}: the checkpoints were made with {stored} lanes, "
          "so the batch order changes from here")
  return configured or stored or process_count


class Trainer:
  def __init__(self, job: Job, model, reader: CacheReader, mesh, *, progress: bool = True,
               teacher=None):
    """`teacher`: the teacher model on `mesh`, needed (and only read) when
    config.train.teacher_mode=online."""
    self.job, self.reader, self.mesh, self.progress = job, reader, mesh, progress
    if needs_teacher(job) != (teacher is not None):
      raise UserError(f"config.train.teacher_mode={job.train.teacher_mode!r}: "
                      + ("needs the teacher loaded beside the student (train.train does)"
                         if teacher is None else "no teacher is run in the step"))
    # The online teacher: (graphdef, template) for the step, its params an input of it.
    self.teacher = None if teacher is None else P.split(teacher)
    self.graphdef, self.template, params = P.split(model)
    self.cfg = model.config
    self.shapes = {k: tuple(v.shape) for k, v in params.items()}
    self.params = self._place_params(params)
    self.workdir = Path(job.workdir)
    self.ckpt = Checkpoints(self.workdir / "checkpoints", keep=job.train.keep)
    self.steps = [stage_steps(s, reader.rows, job.train.batch_size) for s in job.train.stages]
    self.offsets = np.concatenate([[0], np.cumsum(self.steps)]).astype(int).tolist()
    self.sigterm = self.interrupted = False
    self.pool = concurrent.futures.ThreadPoolExecutor(1)
    # Where to continue (stage index, step in stage, opt_state or None); sets self.params
    # from the newest checkpoint and self.lanes, the run's read lanes.
    try:
      self.start = self._restore()
      self.loader = Loader(reader, batch_size=job.train.batch_size, seed=job.seed,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           window=job.cache.shuffle_chunks, prefetch=job.cache.prefetch,
                           lanes=self.lanes)  # refuses bad lanes before any work
    except BaseException:
      self.ckpt.close()
      raise
    # Opened last: a refused checkpoint or loader leaves the workdir as it was.
    stage, step_in_stage, _ = self.start
    self.logger = Logger(self.workdir, jax.process_index() == 0,
                         self.offsets[stage] + step_in_stage)

  # --- hooks a subclass may override (marked @override there): _place_params, _init_opt,
  # _compile_step, _host_metrics -----------------------------------------------------------
  def _place_params(self, params: dict) -> dict:
    """The params the stages train, from the model's (a batched sweep stacks them)."""
    return params

  # --- optimizer / state per stage -------------------------------------------------------
  def _stage_setup(self, i: int):
    stage, tc = self.job.train.stages[i], self.job.train
    tx, trainable_paths, rows = optim.build(stage, tc, self.shapes, self.steps[i])
    return stage, tx, set(trainable_paths), rows

  def _split(self, trainable_paths):
    tr = {k: v for k, v in self.params.items() if k in trainable_paths}
    fr = {k: v for k, v in self.params.items() if k not in trainable_paths}
    return tr, fr

  def _init_opt(self, tx, trainable):
    """Optimizer state on the mesh: moments follow their params' shardings; scalars (step
    counts) are replicated rather than left on one device."""
    out = sharding.opt_state_shardings(tx, trainable, self.mesh)
    return jax.jit(tx.init, out_shardings=out)(trainable)

  def _target_for(self, step: int, meta: dict):
    i, s = meta["stage"], meta["step_in_stage"]
    if i >= len(self.steps) or s > self.steps[i] or step != self.offsets[i] + s:
      raise self.ckpt.mismatch(step, f"stage {i} step {s} is global step {step} there, the "
                               f"config's stages have {self.steps} steps")
    _, tx, paths, _ = self._stage_setup(i)
    tr, _ = self._split(paths)
    return {"params": abstract_like(self.params),
            "opt_state": abstract_like(self._init_opt(tx, tr))}

  def _restore(self):
    """(stage index, step in stage, opt_state or None) to continue from."""
    got = self.ckpt.restore_latest(self._target_for)
    # Checkpoints from before lanes existed were made with one lane.
    self.lanes = read_lanes(self.job.cache.read_lanes, got and got[1].get("read_lanes", 1),
                            jax.process_count())
    if got is None:
      if self.job.train.restart_from:
        self.params = dict(restore_params(self.job.train.restart_from,
                                          abstract_like(self.params)))
        print(f"starting from the params of {self.job.train.restart_from}")
      return 0, 0, None
    step, meta, state = got
    self.params = dict(state["params"])
    # meta["stage"] is an index into the stages (checked by _target_for); the user knows the
    # stages by name.
    print(f"resumed from {self.ckpt.dir / str(step)} (stage "
          f"{self.job.train.stages[meta['stage']].name}, step "
          f"{meta['step_in_stage']})")
    if meta["step_in_stage"] >= self.steps[meta["stage"]]:
      return meta["stage"] + 1, 0, None
    return meta["stage"], meta["step_in_stage"], state["opt_state"]

  # --- the loop ---------------------------------------------------------------------------
  def _batch(self, g: int):
    return self.loader.batch(g)

  def _step_config(self, stage: Stage) -> StepConfig:
    return step_config(self.job, stage, self.cfg,
                       self.reader.temperature_index(stage.temperature))

  def run(self):
    """Runs every remaining stage; returns the final params dict."""
    # More processes: JAX's preemption service has the signal (see _stop_requested).
    old = signal.signal(signal.SIGTERM, self._on_sigterm) if jax.process_count() == 1 else None
    old_int = signal.signal(signal.SIGINT, self._on_sigint)
    try:
      i, s0, opt_state = self.start
      for i in range(i, len(self.steps)):
        self._run_stage(i, s0, opt_state)
        s0, opt_state = 0, None
      self.ckpt.wait()
      return self.params
    finally:
      if old is not None:
        signal.signal(signal.SIGTERM, old)
      signal.signal(signal.SIGINT, old_int)
      self.ckpt.close()
      self.logger.close()

  def _on_sigterm(self, *_):
    self.sigterm = True

  def _on_sigint(self, *_):
    """Ctrl-C: KeyboardInterrupt where the process is, as Python's own handler does, and a
    flag the next step reads: code that catches everything (an asyncio runner inside a
    checkpoint save, a finalizer) can swallow the exception, and the run must still stop.
    Being not Python's default handler, it is also never replaced by an asyncio runner's."""
    self.interrupted = True
    raise KeyboardInterrupt

  def _stop_requested(self, g: int) -> bool:
    """True on every process at the same global step g once any of them got SIGTERM.
    Called at every step on every process (the service's protocol: it settles on the step
    after the largest one any process reported when the notice arrived). Raises
    KeyboardInterrupt after a Ctrl-C that the code it interrupted swallowed."""
    if self.interrupted:
      raise KeyboardInterrupt
    return self.sigterm or multihost_utils.reached_preemption_sync_point(g)

  def _checkpoint(self, i: int, s: int, trainable, frozen, opt_state) -> bool:
    """Saves at stage ends, every checkpoint_every steps and on preemption; True (after the
    save has finished) when preempted."""
    g, stop = self.offsets[i] + s, self._stop_requested(self.offsets[i] + s)
    if s == self.steps[i] or s % self.job.train.checkpoint_every == 0 or stop:
      self.params = {**trainable, **frozen}
      self.ckpt.save(g, {"params": self.params, "opt_state": opt_state},
                     {"stage": i, "step_in_stage": s, "global_step": g,
                      "seed": self.job.seed, "read_lanes": self.lanes}, wait=stop)
    return stop

  def _compile_step(self, stage: Stage, tx, trainable, opt_state):
    # A teacher loaded for on-policy stages only: offline steps still read the cache.
    if self.teacher is None or self.job.train.teacher_mode != "online":
      return jit_train_step(self.graphdef, self.template, tx, self._step_config(stage),
                            trainable, opt_state, self.mesh)
    t_graphdef, t_template, t_params = self.teacher
    fn = jit_train_step(self.graphdef, self.template, tx, self._step_config(stage), trainable,
                        opt_state, self.mesh, (t_graphdef, t_template))
    return lambda tr, fr, opt, batch: fn(tr, fr, opt, batch, t_params)

  def _host_metrics(self, m) -> dict:
    """The step's metrics as the floats that are logged (a batched sweep adds per point)."""
    return {k: float(v) for k, v in jax.device_get(m).items()}

  def _stop_if_not_finite(self, m, stage: Stage, s: int, g: int, bar):
    if np.isfinite(m["loss"]):
      return
    bar.close()
    last = self.ckpt.steps()
    raise UserError(f"loss is {m['loss']} at stage {stage.name} step {s} (global {g}); "
                    f"stopped; last good checkpoint: {last[-1] if last else 'none'}")

  def _run_stage(self, i: int, s0: int, opt_state):
    stage, tx, paths, rows = self._stage_setup(i)
    if jax.process_index() == 0:
      print(optim.format_table(stage, rows), flush=True)
    trainable, frozen = self._split(paths)
    opt_state = opt_state if opt_state is not None else self._init_opt(tx, trainable)
    step_fn = self._compile_step(stage, tx, trainable, opt_state)
    sched = optim.schedule(stage, self.job.train, self.steps[i])
    n, off, tc = self.steps[i], self.offsets[i], self.job.train
    if stage.kind == "on_policy":  # sample-then-score steps, keyed by (seed, global step)
      from moedistill.training import on_policy
      step_fn = on_policy.StageSteps(self, stage, tx, trainable, opt_state, step_fn, off + s0)
    tokens_per_step = tc.batch_size * self.reader.meta["seq_len"]
    # The bar is made after the first step, which compiles: its rate and ETA then count
    # compiled steps only (until then a placeholder, closed by _stop_if_not_finite if need be).
    show = self.progress and jax.process_index() == 0
    bar = tqdm(disable=True)
    nxt, t0 = self.pool.submit(self._batch, off + s0), time.time()
    for s in range(s0 + 1, n + 1):  # s: steps done in this stage after this iteration
      local = nxt.result()
      if s < n:
        nxt = self.pool.submit(self._batch, off + s)  # read ahead while this step runs
      batch = {k: sharding.global_batch(self.mesh, local[k]) for k in BATCH_KEYS}
      trainable, opt_state, m = step_fn(trainable, frozen, opt_state, batch)
      m = self._host_metrics(m)
      self._stop_if_not_finite(m, stage, s, off + s, bar)
      tps = tokens_per_step * (s - s0) / max(time.time() - t0, 1e-9)
      if s == s0 + 1:
        bar = tqdm(total=n, initial=s, desc=f"stage {stage.name}", unit="step",
                   disable=not show, mininterval=1.0)
      else:
        bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
      if s % tc.log_every == 0 or s == n:
        self.logger.log({"stage": stage.name, "step": s, "global_step": off + s,
                         "lr": float(sched(s - 1)), "tokens_per_s": tps, **m})
      if self._checkpoint(i, s, trainable, frozen, opt_state):
        bar.close()
        raise Preempted(f"SIGTERM: saved checkpoint at global step {off + s}")
    bar.close()
    self.params = {**trainable, **frozen}
