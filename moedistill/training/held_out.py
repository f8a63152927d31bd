"""Held-out metrics of a model on a cache's rows: perplexity, KL to the teacher (bucket mode),
top-1 agreement with the teacher; the sharded eval program and its batches (used by the
`evaluate`, `report` and `plan` commands and by `compress`'s routing statistics)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moedistill import sharding
from moedistill.data.cache import CacheReader
from moedistill.errors import ConfigError, UserError
from moedistill.model import resolve
from moedistill.training.train_step import StepConfig, micro_loss


# The program builders are memoised: models of one structure (a report's zero-shot and distilled
# students, a sweep's runs) share one jitted function, so each program compiles once per process.
@functools.lru_cache(maxsize=8)
def eval_program(graphdef, config, temperature: float, t_index: int, chunk: int = 4096,
                 mesh=None, mode: str = "bucket"):
  """The jitted metric sums of one batch, (state, batch) -> sums: the training loss path in
  bucket mode (`sampled` for a sampled cache), alpha 1, no aux. Also what `moedistill.plan`
  compiles."""
  sc = StepConfig(alpha=1.0, temperature=temperature, mode=mode, t_index=t_index,
                  vocab_chunk=chunk, micro_batches=1, aux_coef=0.0,
                  top_k=config.num_experts_per_tok)

  def fn(state, batch):
    return micro_loss(nnx.merge(graphdef, state), batch, 1.0, sc)[1]

  if mesh is None:
    return jax.jit(fn)
  return jax.jit(sharding.on_mesh(mesh, fn), out_shardings=sharding.replicated(mesh))


def make_eval_fn(model, temperature: float, t_index: int, chunk: int = 4096, mesh=None,
                 mode: str = "bucket"):
  graphdef, state = nnx.split(model)
  fn = eval_program(graphdef, model.config, temperature, t_index, chunk, mesh, mode)
  return lambda batch: fn(state, batch)


@functools.lru_cache(maxsize=8)
def full_vocab_program(graphdef, teacher_graphdef, temperature: float, chunk: int = 4096,
                       mesh=None):
  """The jitted exact full-vocab KL(teacher || student) sums of one batch, (state,
  teacher_state, batch) -> {'kl_full', 'tokens'}: both models' final hidden states through
  their own lm_heads, chunk by chunk (online_teacher.full_vocab_kl, no [tokens x vocab])."""
  from moedistill.training.online_teacher import model_kl_sums

  def fn(state, t_state, batch):
    return model_kl_sums(nnx.merge(graphdef, state), nnx.merge(teacher_graphdef, t_state),
                         batch["tokens"], batch["segment_ids"], temperature, chunk)

  if mesh is None:
    return jax.jit(fn)
  return jax.jit(sharding.on_mesh(mesh, fn), out_shardings=sharding.replicated(mesh))


def eval_batch_size(mesh, requested: int) -> int:
  """`requested` rounded up so that every batch shard of the mesh and every process gets
  whole rows (padding rows count for nothing)."""
  if mesh is None:
    return requested
  d = math.lcm(sharding.batch_divisor(mesh), jax.process_count())
  return -(-requested // d) * d


def read_batch(reader: CacheReader, lo: int, n: int, batch_size: int, mesh):
  """Rows lo.. of a fixed-shape batch; on a mesh each process reads only its share."""
  real = np.arange(lo, min(lo + batch_size, n))
  idx = np.pad(real, (0, batch_size - len(real)), mode="edge")
  valid = np.arange(batch_size) < len(real)
  if mesh is not None:
    per = batch_size // jax.process_count()
    mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    idx, valid = idx[mine], valid[mine]
  rows = reader.read_rows(idx)
  rows["segment_ids"][~valid] = 0  # padding rows count for nothing
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in rows.items()}
  return {k: sharding.global_batch(mesh, v) for k, v in rows.items()}


def evaluate_model(model, reader: CacheReader, *, temperature: float = 1.0,
                   batch_size: int = 8, max_rows: int = 0, mesh=None, teacher=None,
                   vocab_chunk: int = 4096) -> dict:
  """Held-out figures of `model`; with `mesh` (the model's params on it) batches are
  sharded over the mesh and every process must call this. With `teacher` (a model on the
  same mesh) also `kl_full`, the exact KL(teacher || model) over the whole vocabulary at
  `temperature` per valid token, and `teacher_topk_mass`, the teacher's mean mass inside the
  cache's top-k at `temperature` (exp of the cached top-k log-probs, summed)."""
  t_index = reader.temperature_index(temperature)
  if t_index is None:
    raise UserError(f"evaluate: temperature={temperature} is not cached in {reader.path} "
                    f"(cached: {reader.meta['temperatures']})")
  # Held-out figures must be exact: refuse (one line) a Runtime that may drop token copies.
  shards = 1 if mesh is None else dict(mesh.shape).get("expert", 1)
  for m in (model, teacher):
    why = None if m is None else resolve.drops(m.runtime, shards)
    if why is not None:
      raise ConfigError(f"evaluate: {why}")
  # A sampled cache has no top-k log-probs for the bucket KL: its `kl` is KL(w || model),
  # w the cached draws' weights (training/loss.py, mode sampled). That is an unbiased
  # estimate of the cross-entropy to the teacher minus the draws' entropy (the latter the
  # same for every model): differences between models are unbiased, the value itself is
  # not the KL to the teacher (--full_vocab gives that).
  kind = "sampled" if reader.kind == "sampled" else "bucket"
  reader.validate(vocab_size=model.config.vocab_size, seq_len=reader.meta["seq_len"],
                  temperature=temperature, mode=kind)
  fn = make_eval_fn(model, temperature, t_index, mesh=mesh, mode=kind)
  full = None
  if teacher is not None:
    if teacher.config.vocab_size != model.config.vocab_size:
      raise UserError(f"evaluate --full_vocab: the teacher's vocab_size="
                      f"{teacher.config.vocab_size}, the model's {model.config.vocab_size}")
    graphdef, state = nnx.split(model)
    t_graphdef, t_state = nnx.split(teacher)
    prog = full_vocab_program(graphdef, t_graphdef, temperature, vocab_chunk, mesh)
    full = lambda batch: prog(state, t_state, batch)  # noqa: E731
  n = min(reader.rows, max_rows) if max_rows else reader.rows
  batch_size = eval_batch_size(mesh, batch_size)
  totals: dict[str, float] = {}
  for lo in range(0, n, batch_size):
    batch = read_batch(reader, lo, n, batch_size, mesh)
    sums = fn(batch)
    if full is not None:
      sums = {**sums, "kl_full": full(batch)["kl_full"]}
    for k, v in sums.items():
      if k in ("router_aux", "moe_dropped"):
        continue
      totals[k] = totals.get(k, 0.0) + float(sharding.to_host(v))
  tok = max(totals["tokens"], 1.0)
  out = {"ppl": math.exp(totals["ce"] / tok), "ce": totals["ce"] / tok,
         "kl": totals["kl"] / tok, "top1_agreement": totals["top1_agreement"] / tok,
         "tokens": int(totals["tokens"]), "temperature": temperature, "kl_kind": kind}
  if full is not None:  # both programs count the same valid tokens (labels_and_mask)
    out.update(kl_full=totals["kl_full"] / tok,
               teacher_topk_mass=totals["teacher_topk_mass"] / tok)
  return out
