"""On-policy distillation (`stages.<name>.kind=on_policy`): the student writes, the teacher
grades (GKD, Agarwal et al., arXiv 2306.13649; Qwen3's strong-to-weak on-policy phase).

Legend: b rows, t = l = seq_len slots, p = l - n prompt slots, n = max_new_tokens, d hidden.

One on-policy step, at global step g (the index of the cache batch the loader gives it):
  1. prompts: each row of the cache batch is cut after c_i tokens, c_i uniform in
     [1, min(p, the row's real tokens)] (the row's documents, joined with EOS, are one prompt);
  2. sample (`sample_program`, not differentiated): the current student continues each prompt
     by up to n tokens (decode.generate at sample_temperature, stop at EOS), giving a full
     [b, l] row again (right-padded with 0, segment 0 after the row's last token);
  3. score (`make_step`): the student and the frozen teacher run over prompt + sample, and
     L = mean over generated tokens (each one's predicting position, up to and including EOS)
     of the generalised JSD(beta) between their full-vocab next-token distributions at
     temperature 1 (online_teacher.divergence: chunked over the vocab, never [tokens x vocab]),
     plus the router aux loss as in an offline step. The sampled tokens are fixed inputs: the
     gradient flows only through the student's forward on them (the teacher is a constant).
Whether step g is on-policy (probability lmbda), where the rows are cut and what is sampled
are pure functions of (seed, g): a resumed run repeats them exactly, so checkpoints and
resume are the offline stage's (params + optimizer state at a global step). The other steps
(1 - lmbda) are the stage's ordinary offline steps on the same cache batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moedistill import sharding
from moedistill.model import decode
from moedistill.training import loss, online_teacher, param_tree as P
from moedistill.training.train_step import accumulate

SAMPLE_KEYS = ("tokens", "segment_ids", "loss_mask")
_TAG = 0x6F6E706F  # "onpo": keeps these streams apart from any other use of the seed


def is_on_policy(seed: int, g: int, lmbda: float) -> bool:
  """Whether global step g of an on-policy stage samples (True with probability lmbda): a
  pure function of (seed, g), the same in every process and after any resume."""
  if lmbda >= 1.0:
    return True
  return bool(np.random.default_rng([_TAG, seed, g]).random() < lmbda)


def step_key(seed, g):
  """The jax key of step g's cut points and samples (seed and g may be traced)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _TAG), g)


def sample_batch(model, tokens_bl, segs_bl, key, max_new_tokens: int, *, temperature=1.0,
                 greedy: bool = False, eos_ids=()):
  """Cuts each row at a random point and continues it with `model`: {'tokens' [b, l],
  'segment_ids' [b, l] (1 on prompt + sample, 0 after), 'loss_mask' [b, l] (position j
  predicts a generated token at j + 1, EOS included), 'new' [b] tokens generated}."""
  b, l = tokens_bl.shape
  p = l - max_new_tokens
  k_cut, k_gen = jax.random.split(key)
  real_b = jnp.sum((segs_bl > 0).astype(jnp.int32), axis=1)
  hi_b = jnp.clip(jnp.minimum(real_b, p), 1, p)
  cut_b = jax.random.randint(k_cut, (b,), 1, hi_b + 1)  # in [1, hi_i]
  out_bl, len_b = decode.generate(model, tokens_bl[:, :p], cut_b, max_new_tokens, k_gen,
                                  greedy=greedy, temperature=temperature, eos_ids=eos_ids,
                                  pad_id=0)
  slots = jnp.arange(l)[None, :]
  segs = (slots < len_b[:, None]).astype(segs_bl.dtype)
  mask = (slots >= cut_b[:, None] - 1) & (slots < len_b[:, None] - 1)
  return {"tokens": jax.lax.stop_gradient(out_bl), "segment_ids": segs, "loss_mask": mask,
          "new": len_b - cut_b}


def sample_program(graphdef, template, stage, mesh, eos_ids):
  """jitted (trainable, frozen, tokens, segment_ids, seed, g) -> sample_batch's dict for
  the current student, traced under `mesh`; rows keep the batch's sharding."""
  eos = tuple(int(e) for e in eos_ids)

  def fn(trainable, frozen, tokens_bl, segs_bl, seed, g):
    model = P.merge(graphdef, template, {**trainable, **frozen})
    return sample_batch(model, tokens_bl, segs_bl, step_key(seed, g), stage.max_new_tokens,
                        temperature=stage.sample_temperature, eos_ids=eos)

  rows = sharding.batch_sharding(mesh, 2)
  out = {"tokens": rows, "segment_ids": rows, "loss_mask": rows,
         "new": sharding.batch_sharding(mesh, 1)}
  return jax.jit(sharding.on_mesh(mesh, fn), out_shardings=out)


def micro_loss(model, teacher, mb, n_valid, sc, beta: float):
  """(loss contribution, metric sums) of one micro-batch of sampled rows."""
  tokens, segs, valid = mb["tokens"], mb["segment_ids"], mb["loss_mask"].reshape(-1)
  hs, aux = model.hidden(tokens, segs)
  ht, _ = teacher.hidden(tokens, segs)
  b, t, d = hs.shape
  ht = jax.lax.stop_gradient(ht.reshape(b * t, -1))
  wt = jax.lax.stop_gradient(teacher.lm_head_kernel())
  out = online_teacher.divergence(hs.reshape(b * t, d), model.lm_head_kernel(), ht, wt, 1.0,
                                  int(sc.vocab_chunk), float(beta))
  s = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
  aux_loss = loss.router_aux_loss(aux["router_logits"], segs > 0, sc.top_k)
  sums = {"kl": s(out["div"]), "tokens": jnp.sum(valid.astype(jnp.float32)),
          "router_aux": aux_loss, "moe_dropped": aux["dropped"].astype(jnp.float32)}
  return s(out["div"]) / n_valid + sc.aux_coef * aux_loss / sc.micro_batches, sums


def make_step(graphdef, template, tx, sc, beta: float, teacher_def):
  """(trainable, frozen, opt_state, sampled rows, teacher params) -> (trainable, opt_state,
  metrics): train_step.make_train_step's shape (micro-batches summed, one optax update) with
  the on-policy loss; metric 'kl' is the mean divergence per generated token."""
  def loss_fn(trainable, frozen, mb, n_valid, teacher_params):
    model = P.merge(graphdef, template, {**trainable, **frozen})
    return micro_loss(model, P.merge(*teacher_def, teacher_params), mb, n_valid, sc, beta)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(trainable, frozen, opt_state, batch, teacher_params):
    n_valid = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    total, sums, grads = accumulate(grad_fn, trainable, frozen, batch, n_valid, teacher_params,
                                    sc.micro_batches)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {"loss": total, "kl": sums["kl"] / tokens, "kd_total": sums["kl"] / tokens,
               "tokens": sums["tokens"], "router_aux": sums["router_aux"] / sc.micro_batches,
               "moe_dropped": sums["moe_dropped"], "grad_norm": optax.tree.norm(grads)}
    return trainable, opt_state, metrics

  return step


def jit_step(graphdef, template, tx, sc, beta, trainable, opt_state, mesh, teacher_def):
  """The jitted on-policy step, donated and sharded as trainer.jit_train_step."""
  shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
  return jax.jit(sharding.on_mesh(mesh, make_step(graphdef, template, tx, sc, beta,
                                                  teacher_def)),
                 donate_argnums=(0, 2),
                 out_shardings=(shard_of(trainable), shard_of(opt_state),
                                sharding.replicated(mesh)))


def eos_of(job, cfg) -> tuple[int, ...]:
  """The ids that end a sample: config.json's eos_token_id, else the tokenizer's (the EOS
  the cache's rows join documents with)."""
  if cfg.eos_token_id is not None:
    ids = cfg.eos_token_id
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(job.train_data.tokenizer)
  return () if tok.eos_token_id is None else (int(tok.eos_token_id),)


class StageSteps:
  """A trainer step function for an on-policy stage: called once per step, in order, from
  global step `first` (the trainer's loop does so); each call is on-policy or offline by
  is_on_policy(seed, g). Both kinds return (trainable, opt_state, metrics) with the same
  optimizer state (one tx per stage), and metrics['on_policy'] says which ran."""

  def __init__(self, trainer, stage, tx, trainable, opt_state, offline_step, first: int):
    if trainer.teacher is None:
      raise ValueError("an on-policy stage needs the trainer's teacher")
    self.stage, self.seed, self.g = stage, trainer.job.seed, first
    self.offline = offline_step
    t_graphdef, t_template, self.t_params = trainer.teacher
    sc = trainer._step_config(stage)
    self.sample = sample_program(trainer.graphdef, trainer.template, stage, trainer.mesh,
                                 eos_of(trainer.job, trainer.cfg))
    self.step = jit_step(trainer.graphdef, trainer.template, tx, sc, stage.beta, trainable,
                         opt_state, trainer.mesh, (t_graphdef, t_template))

  def __call__(self, trainable, frozen, opt_state, batch):
    g, self.g = self.g, self.g + 1
    if not is_on_policy(self.seed, g, self.stage.lmbda):
      trainable, opt_state, m = self.offline(trainable, frozen, opt_state, batch)
      return trainable, opt_state, {**m, "on_policy": 0.0}
    rows = self.sample(trainable, frozen, batch["tokens"], batch["segment_ids"],
                       np.int32(self.seed), np.int32(g))
    new = rows.pop("new")
    trainable, opt_state, m = self.step(trainable, frozen, opt_state, rows, self.t_params)
    return trainable, opt_state, {**m, "on_policy": 1.0,
                                  "new_tokens": jnp.mean(new.astype(jnp.float32))}


def stage_programs(job, cfg, rt, mesh, stage, student_def, tx, tr, fr, opt, params):
  """`plan`'s programs of an on-policy stage, with abstract inputs: `sample_<name>` (the
  student's decode of one global batch of prompts; the teacher and the Adam state stay
  resident beside it) and `score_<name>` (the on-policy step: both models' forwards over
  prompt + sample, the fused divergence, its backward and the update; the teacher's params
  an argument). student_def: the abstract student's (graphdef, template); tr / fr / opt /
  params: abstract trainable, frozen, optimizer state and all student params."""
  from moedistill.abstract_programs import abstract_model, batch_specs, lower
  from moedistill.hlo_cost import Program, device_bytes
  from moedistill.training.trainer import step_config
  graphdef, template = student_def
  t_graphdef, t_template, teacher = abstract_model(cfg, rt, None, mesh)
  b = batch_specs(mesh, job.train.batch_size, job.train_data.seq_len, 1, 1)
  rows = {"tokens": b["tokens"], "segment_ids": b["segment_ids"],
          "loss_mask": jax.ShapeDtypeStruct(b["tokens"].shape, jnp.bool_,
                                            sharding=b["tokens"].sharding)}
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  eos = cfg.eos_token_id if cfg.eos_token_id is not None else ()
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),) if eos != () else ()
  sample = sample_program(graphdef, template, stage, mesh, eos)
  step = jit_step(graphdef, template, tx, step_config(job, stage, cfg, None), stage.beta, tr,
                  opt, mesh, (t_graphdef, t_template))
  both, t_bytes, o_bytes = device_bytes(params) + device_bytes(teacher), \
      device_bytes(teacher), device_bytes(opt)
  return [Program(f"sample_{stage.name}",
                  lambda: lower(sample, tr, fr, b["tokens"], b["segment_ids"], scalar, scalar),
                  both, o_bytes, resident=t_bytes + o_bytes),
          Program(f"score_{stage.name}", lambda: lower(step, tr, fr, opt, rows, teacher),
                  both, o_bytes)]
