"""The programs `train` runs, built with abstract inputs (ShapeDtypeStructs in train's
shardings, no weights: the teacher directory needs only its config.json), for `plan` to compile
or cross-lower. Each program wraps the jitted function its subsystem runs (cache_logits'
forward, compress' factorisation, the trainer's step, held-out eval, the export's merge), so
what is measured is what runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from moedistill import sharding
from moedistill.config import Job
from moedistill.errors import ConfigError
from moedistill.hlo_cost import Program, device_bytes
from moedistill.model import resolve
from moedistill.model.config import ModelConfig
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import PROJS, Compression
from moedistill.training import optim, param_tree as P


def lower(fn, *args):
  """fn.lower(*args), for the target platform (resolve.target()): another one than this
  host's when `--platform` cross-lowers (jax lowers without compiling or any device of it)."""
  target = resolve.target().platform
  platforms = None if target == resolve.host_target().platform else (target,)
  return fn.trace(*args).lower(lowering_platforms=platforms)


def abstract_model(cfg: ModelConfig, rt: Runtime, comp: Compression | None, mesh):
  """(graphdef, template, params): params are ShapeDtypeStructs in train's shardings."""
  model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt,
                                                     compression=comp))
  graphdef, template, params = P.split(model)
  axes = P.logical_axes(template)
  return graphdef, template, {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                              sharding=sharding.param_sharding(mesh, v.shape, axes[k]))
      for k, v in params.items()}


def cache_batch_shape(c) -> tuple[int, int, object]:
  """(entries per position, lse columns, logit dtype) of the batches a cache of config `c`
  feeds: a sampled cache's exact_k + samples weights (float32, one temperature), a packed
  cache's decoded float32 logits, a plain cache's bf16 (data/cache.py CacheReader.decode)."""
  if c.mode == "sampled":
    return c.exact_k + c.samples, 1, jnp.float32
  return c.k, len(c.temperatures), jnp.float32 if c.format == "packed" else jnp.bfloat16


def batch_specs(mesh, rows: int, seq_len: int, k: int, n_temps: int,
                logit_dtype=jnp.bfloat16) -> dict:
  """Abstract cache batch, sharded over the batch axes as train and eval feed it."""
  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  return {"tokens": sds((rows, seq_len), jnp.int32),
          "segment_ids": sds((rows, seq_len), jnp.int32),
          "topk_idx": sds((rows, seq_len, k), jnp.int32),
          "topk_logit": sds((rows, seq_len, k), logit_dtype),
          "lse": sds((rows, seq_len, n_temps), jnp.float32)}


def _abstract_state(template, params):
  """The nnx.State of an abstract model (what programs that take `state` are lowered with)."""
  return nnx.from_flat_state([(p, v.replace(params[P.dotted(p)]) if isinstance(v, nnx.Param)
                               else v) for p, v in template])


def cache_program(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> Program:
  from moedistill.cache_logits import forward_program
  graphdef, template, params = abstract_model(cfg, rt, None, mesh)
  state = _abstract_state(template, params)
  rows = job.cache.rows_per_chunk * job.cache.chunks_per_step * jax.process_count()
  if rows % sharding.batch_divisor(mesh):
    raise ConfigError(f"config.cache.rows_per_chunk x chunks_per_step x processes = {rows} rows "
                      f"per step, not divisible by the mesh's {sharding.batch_divisor(mesh)} "
                      "batch shards")
  tok = batch_specs(mesh, rows, job.train_data.seq_len, 1, 1)["tokens"]
  # a sampled cache's forward also takes the draws' uniforms [rows, seq_len, samples]
  u = ([jax.ShapeDtypeStruct((rows, job.train_data.seq_len, job.cache.samples), jnp.float32,
                             sharding=sharding.batch_sharding(mesh, 3))]
       if job.cache.mode == "sampled" else [])
  fn = forward_program(graphdef, mesh, job)
  return Program("cache_forward", lambda: lower(fn, state, tok, tok, *u), device_bytes(params))


def compress_programs(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> list[Program]:
  """One layer's factorisation per projection; the whole teacher and the student being
  built stay resident meanwhile."""
  from moedistill.compress import factor_program
  comp = Compression(*job.ranks)
  _, _, teacher = abstract_model(cfg, rt, None, mesh)
  _, _, student = abstract_model(cfg, rt, comp, mesh)
  resident = device_bytes(teacher) + device_bytes(student)
  base = f"layers.{cfg.moe_layers[0]}.mlp.experts."
  out = []
  for q in PROJS:
    names = (f"shared_core.{q}", f"wrapper.{q}_a", f"wrapper.{q}_b")
    fn = factor_program(mesh, comp.rank(q), [student[base + n].sharding for n in names])
    w = teacher[base + f"{q}_proj"]
    out.append(Program(f"compress_{q}", lambda fn=fn, w=w: lower(fn, w, None), resident,
                       resident=resident))
  return out


def train_programs(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> list[Program]:
  """Each stage's train step: trainable params, frozen params, Adam state, one global batch;
  with train.teacher_mode=online also the teacher's params (an input of the step, so both
  models are resident and counted in its argument bytes); with an on-policy stage in the job
  the teacher counted resident beside the offline steps."""
  from moedistill.training.trainer import jit_train_step, needs_teacher, step_config
  graphdef, template, params = abstract_model(cfg, rt, Compression(*job.ranks), mesh)
  teacher_def, teacher, t_resident = None, {}, 0
  if job.train.teacher_mode == "online":
    t_graphdef, t_template, teacher = abstract_model(cfg, rt, None, mesh)
    teacher_def = (t_graphdef, t_template)
  elif needs_teacher(job):  # an on-policy stage: train loads the teacher for the whole run,
    # so it stays resident beside every offline step (of any stage), not an input of them
    t_resident = device_bytes(abstract_model(cfg, rt, None, mesh)[2])
  shapes = {k: v.shape for k, v in params.items()}
  c = job.cache
  batch = batch_specs(mesh, job.train.batch_size, job.train_data.seq_len,
                      *cache_batch_shape(c))
  out = []
  for stage in job.train.stages:
    tx, paths, _ = optim.build(stage, job.train, shapes, max(stage.steps, 1))
    tr = {k: v for k, v in params.items() if k in paths}
    fr = {k: v for k, v in params.items() if k not in paths}
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(tx.init, tr), sharding.opt_state_shardings(tx, tr, mesh))
    t_index = c.temperatures.index(stage.temperature) if stage.temperature in c.temperatures \
        else None
    fn = jit_train_step(graphdef, template, tx, step_config(job, stage, cfg, t_index), tr, opt,
                        mesh, teacher_def)
    if stage.kind == "on_policy":  # sample and score programs (training/on_policy.py), and
      from moedistill.training.on_policy import stage_programs  # offline steps if lmbda < 1
      out += stage_programs(job, cfg, rt, mesh, stage, (graphdef, template), tx, tr, fr, opt,
                            params)
      if stage.lmbda >= 1.0:
        continue
    args = (batch,) if teacher_def is None else (batch, teacher)
    # params: the student's and, online, the teacher's (both resident during the step)
    out.append(Program(f"train_{stage.name}",
                       lambda fn=fn, tr=tr, fr=fr, opt=opt: lower(fn, tr, fr, opt, *args),
                       device_bytes(params) + device_bytes(teacher), device_bytes(opt),
                       resident=t_resident))
  return out


def eval_program(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> Program:
  """The report's largest evaluation: a dense model (the teacher; the merged export has the
  same shapes) on one eval batch."""
  from moedistill.training import held_out
  rt = dataclasses.replace(rt, remat="none", capacity_factor=Runtime.capacity_factor)
  graphdef, template, params = abstract_model(cfg, rt, None, mesh)
  state = _abstract_state(template, params)
  c = job.cache
  batch = batch_specs(mesh, held_out.eval_batch_size(mesh, 8), job.train_data.seq_len,
                      *cache_batch_shape(c))
  fn = held_out.eval_program(graphdef, cfg, c.temperatures[0], 0, mesh=mesh,
                             mode="sampled" if c.mode == "sampled" else "bucket")
  return Program("eval", lambda: lower(fn, state, batch), device_bytes(params))


def export_program(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> Program:
  """The merged export: one layer's W_e = core + A_e B_e at a time, cast to the checkpoint
  dtype on the devices; the trained student stays resident."""
  from moedistill.hub import hf
  _, _, student = abstract_model(cfg, rt, Compression(*job.ranks), mesh)
  base = f"layers.{cfg.moe_layers[0]}.mlp.experts."
  parts = [student[base + n] for n in ("shared_core.gate", "wrapper.gate_a", "wrapper.gate_b")]
  dtype = hf.checkpoint_dtype(job.teacher)
  resident = device_bytes(student)
  return Program("export", lambda: lower(hf.merge_cast, *parts, dtype), resident,
                 resident=resident)


PROGRAMS = ("cache_forward", "compress", "train", "eval", "export")


def programs(job: Job, mesh, which=PROGRAMS) -> list[Program]:
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  sharding.check_model_fits_mesh(cfg, mesh)
  rt = job.model  # `auto` resolves per model, for its shapes, in the model constructor
  builders = {"cache_forward": lambda: [cache_program(job, cfg, rt, mesh)],
              "compress": lambda: compress_programs(job, cfg, rt, mesh),
              "train": lambda: train_programs(job, cfg, rt, mesh),
              "eval": lambda: [eval_program(job, cfg, rt, mesh)],
              "export": lambda: [export_program(job, cfg, rt, mesh)]}
  return [p for name in which for p in builders[name]()]
