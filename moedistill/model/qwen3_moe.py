"""Qwen3-MoE causal LM in Flax NNX, matching transformers' Qwen3MoeForCausalLM.

Legend: b batch, t/s query/key positions, d hidden, n query heads, g kv heads, h head dim,
e experts, f expert intermediate, i dense intermediate, v vocab.

Param paths are the user interface (regex groups match them), e.g.
`layers.3.self_attn.q_proj.kernel`, `layers.3.mlp.gate.kernel` (router),
`layers.3.mlp.experts.gate_proj` [e, d, f], `embed_tokens.embedding`, `lm_head.kernel`.
The experts module is a seam: `MoeBlock(..., experts=...)` takes any module with
`__call__(dispatch, x_td) -> y_td`: dense experts (the teacher) or, when the model is built
with a `Compression`, shared-core experts (`layers.3.mlp.experts.shared_core.gate`,
`layers.3.mlp.experts.wrapper.gate_a`, ...; see shared_core.py).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moedistill.errors import ConfigError
from moedistill.model import attention, expert_parallel, moe
from moedistill.model.config import ModelConfig
from moedistill.model.layers import (REMAT_POLICIES, Linear, RMSNorm, Runtime, param,
                                     positions_from_segments, rope)
from moedistill.model.shared_core import Compression, SharedCoreExperts


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    d, n, g, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b = cfg.attention_bias
    self.q_proj = Linear(d, n * h, ("embed", "q_heads"), rt, rngs, bias=b)
    self.k_proj = Linear(d, g * h, ("embed", "kv_heads"), rt, rngs, bias=b)
    self.v_proj = Linear(d, g * h, ("embed", "kv_heads"), rt, rngs, bias=b)
    self.o_proj = Linear(n * h, d, ("q_heads", "embed"), rt, rngs, bias=b)
    self.q_norm = RMSNorm(h, cfg.rms_norm_eps, rt)
    self.k_norm = RMSNorm(h, cfg.rms_norm_eps, rt)
    self.n, self.g, self.h, self.theta, self.rt = n, g, h, cfg.rope_theta, rt

  def qkv(self, x_btd, positions_bt):
    """Queries [b, t, n, h] and keys [b, t, g, h] (normed, rotated) and values [b, t, g, h]."""
    b, t, _ = x_btd.shape
    q_btnh = rope(self.q_norm(self.q_proj(x_btd).reshape(b, t, self.n, self.h)), positions_bt,
                  self.theta)
    k_btgh = rope(self.k_norm(self.k_proj(x_btd).reshape(b, t, self.g, self.h)), positions_bt,
                  self.theta)
    return q_btnh, k_btgh, self.v_proj(x_btd).reshape(b, t, self.g, self.h)

  def __call__(self, x_btd, positions_bt, segment_ids_bt):
    b, t, _ = x_btd.shape
    q_btnh, k_btgh, v_btgh = self.qkv(x_btd, positions_bt)
    impl = attention.resolve(self.rt.attention, t, self.rt.dtype, self.rt.attention_block)
    o_btnh = attention.attention(q_btnh, k_btgh, v_btgh, segment_ids_bt, impl=impl,
                                 block=self.rt.attention_block)
    return self.o_proj(o_btnh.reshape(b, t, self.n * self.h))


class DenseMLP(nnx.Module):
  def __init__(self, d: int, i: int, rt: Runtime, rngs: nnx.Rngs):
    self.gate_proj = Linear(d, i, ("embed", "mlp"), rt, rngs)
    self.up_proj = Linear(d, i, ("embed", "mlp"), rt, rngs)
    self.down_proj = Linear(i, d, ("mlp", "embed"), rt, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseExperts(nnx.Module):
  """The teacher's experts: full per-expert matrices, stacked."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.gate_proj = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), rt)
    self.up_proj = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), rt)
    self.down_proj = param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), rt)

  def __call__(self, dispatch, x_td):
    return moe.expert_ffn(dispatch, x_td, self.gate_proj[...], self.up_proj[...],
                          self.down_proj[...])


class MoeBlock(nnx.Module):
  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs, experts: nnx.Module):
    self.gate = Linear(cfg.hidden_size, cfg.num_experts, ("embed", None), rt, rngs)
    self.experts = experts
    self.k, self.norm_topk, self.e, self.rt = (cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                               cfg.num_experts, rt)

  def __call__(self, x_btd):
    mesh = expert_parallel.active_mesh()
    if mesh is not None:  # under a multi-device mesh: shard_map, tokens go to their experts
      return expert_parallel.moe_block(mesh, self, x_btd)
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    logits_te, weights_tk, experts_tk = moe.route(x_td, self.gate.kernel[...], self.k,
                                                  self.norm_topk)
    dispatch = moe.make_dispatch(self.rt.moe_backend, experts_tk, weights_tk, self.e,
                                 self.rt.capacity_factor)
    y_td = self.experts(dispatch, x_td)
    return y_td.reshape(b, t, d), logits_te.reshape(b, t, -1), dispatch.dropped


ExpertsFactory = Callable[[ModelConfig, Runtime, nnx.Rngs], nnx.Module]


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, idx: int, rt: Runtime, rngs: nnx.Rngs,
               experts_factory: ExpertsFactory):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt)
    self.self_attn = Attention(cfg, rt, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt)
    self.is_moe = cfg.is_moe_layer(idx)
    if self.is_moe:
      self.mlp = MoeBlock(cfg, rt, rngs, experts_factory(cfg, rt, rngs))
    else:
      self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, rt, rngs)

  def __call__(self, x_btd, positions_bt, segment_ids_bt):
    x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), positions_bt, segment_ids_bt)
    h_btd = self.post_attention_layernorm(x_btd)
    if self.is_moe:
      y_btd, router_logits, dropped = self.mlp(h_btd)
      return x_btd + y_btd, router_logits, dropped
    return x_btd + self.mlp(h_btd), None, None


class Qwen3MoeForCausalLM(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime(),
               compression: Compression | None = None):
    rt = moe.resolve_runtime(runtime, cfg, compression)
    if rt.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat={rt.remat!r}: expected one of {list(REMAT_POLICIES)}")
    if rt.scan_layers and len(set(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))) > 1:
      raise ConfigError(f"scan_layers=True needs identical layers, but layers {cfg.moe_layers} "
                        "are MoE and the rest dense; expected scan_layers=False for this model")
    self.config, self.runtime, self.compression = cfg, rt, compression
    experts_factory: ExpertsFactory = DenseExperts
    if compression is not None:
      experts_factory = lambda c, r, g: SharedCoreExperts(c, compression, r, g)  # noqa: E731
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=rt.param_dtype,
                                  dtype=rt.dtype, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(0.02))
    self.embed_tokens.embedding.set_metadata(logical_axes=("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(cfg, i, rt, rngs, experts_factory)
                            for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt)
    self.lm_head = (None if cfg.tie_word_embeddings
                    else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rt, rngs))

  def hidden(self, tokens_bt, segment_ids_bt=None, positions_bt=None):
    """Final-norm hidden states [b, t, d] and aux: router_logits (per MoE layer, f32), dropped."""
    if positions_bt is None:
      positions_bt = (positions_from_segments(segment_ids_bt) if segment_ids_bt is not None
                      else jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape))
    x_btd = self.embed_tokens(tokens_bt).astype(self.runtime.dtype)
    run = self._scan_layers if self.runtime.scan_layers else self._loop_layers
    x_btd, router_logits, dropped = run(x_btd, positions_bt, segment_ids_bt)
    return self.norm(x_btd), {"router_logits": router_logits, "dropped": dropped}

  def _loop_layers(self, x_btd, positions_bt, segment_ids_bt):
    """Unrolled: one copy of the layer per layer in the program."""
    router_logits, dropped = [], jnp.zeros((), jnp.int32)
    call = lambda lyr, *a: lyr(*a)  # noqa: E731
    if self.runtime.remat != "none":
      call = nnx.remat(call, policy=REMAT_POLICIES[self.runtime.remat])
    for layer in self.layers:
      x_btd, logits, drop = call(layer, x_btd, positions_bt, segment_ids_bt)
      if logits is not None:
        router_logits.append(logits)
        dropped = dropped + drop
    return x_btd, tuple(router_logits), dropped

  def _scan_layers(self, x_btd, positions_bt, segment_ids_bt):
    """One layer body in a lax.scan over the layers' params, stacked here, inside the step:
    params stay `layers.N....` (regex groups, checkpoints and HF keys unchanged), at the cost
    of a stacked copy of the layer params (and of their gradient) per step."""
    graphdefs, states = zip(*(nnx.split(layer) for layer in self.layers))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(x_btd, state):
      x_btd, logits, drop = nnx.merge(graphdefs[0], state)(x_btd, positions_bt, segment_ids_bt)
      return x_btd, (logits, drop)

    if self.runtime.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.runtime.remat])
    x_btd, (logits_l, drop_l) = jax.lax.scan(body, x_btd, stacked)
    if logits_l is None:  # dense layers only
      return x_btd, (), jnp.zeros((), jnp.int32)
    return x_btd, tuple(logits_l), jnp.sum(drop_l)

  def lm_head_kernel(self):
    """[d, v] output projection (the embedding's transpose when tied)."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def __call__(self, tokens_bt, segment_ids_bt=None, positions_bt=None):
    """Returns (logits [b, t, v] in the compute dtype, aux)."""
    h_btd, aux = self.hidden(tokens_bt, segment_ids_bt, positions_bt)
    w_dv = self.lm_head_kernel().astype(self.runtime.dtype)
    return jnp.dot(h_btd, w_dv), aux
