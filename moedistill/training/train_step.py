"""The pure, jitted distillation step: fused KD loss + router aux, micro-batching, optax.

Legend: b rows, t positions, d hidden, k cached top-k, m micro-batches.
Params are split into `trainable` and `frozen` dicts; only `trainable` is differentiated and
has optimizer state. The loss of a micro-batch is its sum over valid tokens divided by the
global batch's count, so micro-batches and shards add up to the same mean.
The router load-balancing loss is computed per micro-batch (as transformers does with
gradient accumulation) and averaged over micro-batches.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from moedistill.training import loss, online_teacher, param_tree as P
from moedistill.training.fused_stats import vocab_stats

BATCH_KEYS = ("tokens", "segment_ids", "topk_idx", "topk_logit", "lse")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  alpha: float
  temperature: float
  mode: str
  t_index: int | None      # column of the cached lse at this temperature (None: not cached)
  vocab_chunk: int
  micro_batches: int
  aux_coef: float
  top_k: int               # experts per token (for the aux loss)
  k: int = 0               # cached teacher entries used (0 = all): the first k' of a
                           # sorted top-k are exactly a top-k' cache
  online: bool = False     # teacher_mode=online: KD against the teacher run in the step
                           # (exact full-vocab KL); the cached top-k are not read


def labels_and_mask(tokens_bt, segs_bt):
  labels = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros_like(tokens_bt[:, :1])], axis=1)
  same = (segs_bt[:, 1:] == segs_bt[:, :-1]) & (segs_bt[:, :-1] > 0)
  return labels, jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)


def teacher_lse(batch, sc: StepConfig):
  if sc.t_index is not None:
    return batch["lse"][..., sc.t_index]
  # T not cached (renormalize / teacher_only modes): the top-k alone normalise the teacher.
  return jax.nn.logsumexp(batch["topk_logit"].astype(jnp.float32) / sc.temperature, axis=-1)


def micro_loss(model, batch, n_valid, sc: StepConfig, teacher=None):
  """(loss contribution, metric sums) of one micro-batch; `teacher` (a model, frozen) is
  run on the same tokens when sc.online."""
  tokens, segs = batch["tokens"], batch["segment_ids"]
  if sc.online:
    loss_sum, sums, aux = online_teacher.micro_sums(model, teacher, tokens, segs, sc)
    aux_loss = loss.router_aux_loss(aux["router_logits"], segs > 0, sc.top_k)
    sums = {**sums, "router_aux": aux_loss, "moe_dropped": aux["dropped"].astype(jnp.float32)}
    return loss_sum / n_valid + sc.aux_coef * aux_loss / sc.micro_batches, sums
  if sc.k:
    batch = {**batch, "topk_idx": batch["topk_idx"][..., :sc.k],
             "topk_logit": batch["topk_logit"][..., :sc.k]}
  labels, mask = labels_and_mask(tokens, segs)
  h_btd, aux = model.hidden(tokens, segs)
  b, t, d = h_btd.shape
  k = batch["topk_idx"].shape[-1]
  idx = batch["topk_idx"].reshape(b * t, k)
  stats = vocab_stats(h_btd.reshape(b * t, d), model.lm_head_kernel(), idx,
                      labels.reshape(-1), sc.temperature, sc.vocab_chunk)
  loss_sum, sums = loss.loss_from_stats(
      stats, idx, batch["topk_logit"].reshape(b * t, k), teacher_lse(batch, sc).reshape(-1),
      mask.reshape(-1), alpha=sc.alpha, temperature=sc.temperature, mode=sc.mode)
  aux_loss = loss.router_aux_loss(aux["router_logits"], segs > 0, sc.top_k)
  sums = {**sums, "router_aux": aux_loss, "moe_dropped": aux["dropped"].astype(jnp.float32)}
  return loss_sum / n_valid + sc.aux_coef * aux_loss / sc.micro_batches, sums


def split_micro(batch, m: int):
  """[b, ...] -> [m, b/m, ...], row r to micro-batch r % m (each shard feeds every one)."""
  def one(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def accumulate(grad_fn, trainable, frozen, batch, n_valid, teacher_params, micro_batches: int):
  """(total loss, summed statistics, gradients) of `grad_fn` over the batch's micro-batches:
  one call when micro_batches == 1, else a scan whose sums equal the one-batch call's (every
  micro-batch's loss is already normalised by the global batch's `n_valid`)."""
  if micro_batches == 1:
    (total, sums), grads = grad_fn(trainable, frozen, batch, n_valid, teacher_params)
    return total, sums, grads

  def body(carry, mb):
    g_acc, t_acc, s_acc = carry
    (tl, s), g = grad_fn(trainable, frozen, mb, n_valid, teacher_params)
    return (jax.tree.map(jnp.add, g_acc, g), t_acc + tl, jax.tree.map(jnp.add, s_acc, s)), None

  mbs = split_micro(batch, micro_batches)
  zeros_s = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], mbs), n_valid,
                      teacher_params)[0][1]))
  (grads, total, sums), _ = jax.lax.scan(
      body, (jax.tree.map(jnp.zeros_like, trainable), 0.0, zeros_s), mbs)
  return total, sums, grads


def make_train_step(graphdef, template, tx: optax.GradientTransformation, sc: StepConfig,
                    teacher_def=None):
  """`teacher_def`: the teacher's (graphdef, template) when sc.online; the step then takes
  its params dict as a fifth argument (no gradient, no optimizer state)."""
  def loss_fn(trainable, frozen, mb, n_valid, teacher_params):
    model = P.merge(graphdef, template, {**trainable, **frozen})
    teacher = None if teacher_def is None else P.merge(*teacher_def, teacher_params)
    return micro_loss(model, mb, n_valid, sc, teacher)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # w.r.t. trainable only

  def step(trainable, frozen, opt_state, batch, teacher_params=None):
    _, mask = labels_and_mask(batch["tokens"], batch["segment_ids"])
    n_valid = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    total, sums, grads = accumulate(grad_fn, trainable, frozen, batch, n_valid, teacher_params,
                                    sc.micro_batches)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = loss.finalize(sums["kd_total"], {k: v for k, v in sums.items()
                                               if k not in ("router_aux", "moe_dropped")})[1]
    metrics.update(loss=total, router_aux=sums["router_aux"] / sc.micro_batches,
                   moe_dropped=sums["moe_dropped"], grad_norm=optax.tree.norm(grads))
    return trainable, opt_state, metrics

  return step
