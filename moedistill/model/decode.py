"""KV-cached autoregressive decoding for the NNX Qwen3-MoE (the `generate` command, and later
the on-policy stage's sampler).

Legend: b batch, p prompt slots (the longest prompt), n new tokens, l = p + n buffer slots,
t tokens of one call (p in the prefill, 1 in a step), d hidden, q query heads, g kv heads,
h head dim, v vocab.

Layout: rows are right-padded. Row i's prompt fills slots [0, len_i), its j-th new token goes
to slot len_i + j, and a token's RoPE position is its slot, so a row computes exactly what it
would alone, whatever the other rows' lengths. The cache is one (k, v) pair per layer,
[b, l, g, h]. The prefill runs all p slots of every row at once and writes slots [0, p); a row's
padding slots [len_i, p) hold garbage keys then, but the only mask needed is causal in slots
(key slot <= query slot): a padding slot lies after every real query of the prefill, and
decode step j writes slot len_i + j (per row, dynamic_update_slice) before that row's query
at the same slot reads it, so every slot a query can see was written by a real token.

Numerics are the model's own: the same norm, projection, RoPE and MoE modules (layer.mlp
routes the b tokens of a step like any other tokens; pick a dropless MoE backend, as the
generate command does, since `capacity` may drop copies of a tiny batch), and attention is
jax.nn.dot_product_attention with an explicit mask, the function the model's `plain` path
calls. Everything is fixed-shape under jit; the loop is a lax.while_loop that stops after
n tokens or once every row has produced an EOS.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp



def init_cache(model, batch: int, length: int):
  """Zeroed (k, v) per layer, each [b, l, g, h] in the compute dtype."""
  cfg = model.config
  shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
  z = jnp.zeros(shape, model.runtime.dtype)
  return tuple((z, z) for _ in model.layers)


def _write(cache_blgh, new_btgh, start_b):
  """cache[i, start_i:start_i + t] = new[i] for every row (each at its own slot)."""
  return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (s, 0, 0)))(
      cache_blgh, new_btgh.astype(cache_blgh.dtype), start_b)


def _attend(attn, x_btd, slots_bt, cache):
  """One attention layer for t new tokens at `slots_bt` (also their positions): their keys and
  values go into the cache at those slots, then the queries attend to every slot at or
  before their own. Returns (output [b, t, d], new cache)."""
  b, t, _ = x_btd.shape
  q_btqh, k_btgh, v_btgh = attn.qkv(x_btd, slots_bt)
  k_cache, v_cache = cache
  start_b = slots_bt[:, 0]  # a call's t tokens occupy consecutive slots
  k_cache, v_cache = _write(k_cache, k_btgh, start_b), _write(v_cache, v_btgh, start_b)
  key_slots = jnp.arange(k_cache.shape[1])
  mask_b1tl = (key_slots[None, None, :] <= slots_bt[:, :, None])[:, None]
  o_btqh = jax.nn.dot_product_attention(q_btqh, k_cache, v_cache, mask=mask_b1tl,
                                        implementation="xla")
  return attn.o_proj(o_btqh.reshape(b, t, attn.n * attn.h)), (k_cache, v_cache)


def forward(model, tokens_bt, slots_bt, caches):
  """Final-norm hidden states [b, t, d] of `tokens_bt` at `slots_bt`, and the updated caches:
  the model's decoder layers, attention through the cache."""
  x_btd = model.embed_tokens(tokens_bt).astype(model.runtime.dtype)
  new = []
  for layer, cache in zip(model.layers, caches):
    a_btd, cache = _attend(layer.self_attn, layer.input_layernorm(x_btd), slots_bt, cache)
    x_btd = x_btd + a_btd
    h_btd = layer.post_attention_layernorm(x_btd)
    y_btd = layer.mlp(h_btd)[0] if layer.is_moe else layer.mlp(h_btd)
    x_btd = x_btd + y_btd
    new.append(cache)
  return model.norm(x_btd), tuple(new)


def logits(model, h_bd):
  """Float32 next-token logits [b, v] of final hidden states (the model's own lm_head matmul
  in the compute dtype, as Qwen3MoeForCausalLM.__call__)."""
  w_dv = model.lm_head_kernel().astype(model.runtime.dtype)
  return jnp.dot(h_bd, w_dv).astype(jnp.float32)


def sample(logits_bv, key, greedy: bool, temperature=1.0, top_p=1.0):
  """Next token per row [b] int32. greedy: argmax (first index on ties, as torch). Else
  softmax(logits / temperature) restricted to the nucleus: the most probable tokens whose
  probabilities, taken in descending order, reach top_p (the token that crosses top_p is
  kept, so the nucleus is never empty; tokens tied with its logit are kept too). Row i draws
  with fold_in(key, i), so a row's draw does not depend on the batch around it."""
  if greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  scaled = logits_bv.astype(jnp.float32) / temperature
  sorted_bv = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_bv, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more probable tokens
  keep = before < top_p
  keep = keep.at[:, 0].set(True)
  cutoff_b = jnp.min(jnp.where(keep, sorted_bv, jnp.inf), axis=-1)
  masked = jnp.where(scaled >= cutoff_b[:, None], scaled, -jnp.inf)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(logits_bv.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def generate(model, prompt_tokens_bp, prompt_lens_b, max_new_tokens: int, key, *,
             greedy: bool, temperature=1.0, top_p=1.0, eos_ids=(), pad_id: int = 0):
  """Continues each row's prompt by up to `max_new_tokens` tokens.

  prompt_tokens_bp: right-padded prompts [b, p] (slots >= prompt_lens_b[i] are ignored);
  prompt_lens_b: [b], each >= 1. greedy (static) picks argmax; else `sample` with
  temperature > 0 and top_p in (0, 1] (both may be traced). eos_ids: ids that end a row (the
  EOS is kept in the output; an empty tuple or array: rows never end early). Step j's
  sampling key is fold_in(key, j).

  Returns (tokens [b, p + max_new_tokens] int32: prompt then new tokens, pad_id after;
  lengths [b]: prompt + new tokens, EOS included). Fixed shapes: usable under jax.jit.
  """
  b, p = prompt_tokens_bp.shape
  n = max_new_tokens
  length = p + n
  lens_b = prompt_lens_b.astype(jnp.int32)
  eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
  slots = jnp.arange(length)
  tokens_bl = jnp.full((b, length), pad_id, jnp.int32)
  tokens_bl = tokens_bl.at[:, :p].set(
      jnp.where(slots[None, :p] < lens_b[:, None], prompt_tokens_bp.astype(jnp.int32), pad_id))

  def pick(h_bd, step):
    return sample(logits(model, h_bd), jax.random.fold_in(key, step), greedy, temperature,
                  top_p)

  # Prefill: every prompt slot at once; the first new token comes from slot len_i - 1.
  caches = init_cache(model, b, length)
  h_bpd, caches = forward(model, tokens_bl[:, :p], jnp.broadcast_to(slots[:p], (b, p)), caches)
  first_b = pick(h_bpd[jnp.arange(b), lens_b - 1], 0)
  tokens_bl = tokens_bl.at[jnp.arange(b), lens_b].set(first_b)
  done_b = jnp.isin(first_b, eos)
  new_b = jnp.ones((b,), jnp.int32)

  def cond(carry):
    j, _, _, done_b, _, _ = carry
    return (j < n - 1) & ~jnp.all(done_b)

  def body(carry):
    # Step j: the token at slot len_i + j (written last) goes through the model; its
    # successor goes to slot len_i + j + 1 in rows that have not ended.
    j, tokens_bl, caches, done_b, new_b, cur_b = carry
    at_b = lens_b + j
    h_b1d, caches = forward(model, cur_b[:, None], at_b[:, None], caches)
    nxt_b = pick(h_b1d[:, 0], j + 1)
    live_b = ~done_b
    rows = jnp.arange(b)
    tokens_bl = tokens_bl.at[rows, at_b + 1].set(
        jnp.where(live_b, nxt_b, tokens_bl[rows, at_b + 1]))
    new_b = new_b + live_b.astype(jnp.int32)
    done_b = done_b | jnp.isin(nxt_b, eos)
    return j + 1, tokens_bl, caches, done_b, new_b, nxt_b

  carry = (jnp.zeros((), jnp.int32), tokens_bl, caches, done_b, new_b, first_b)
  _, tokens_bl, _, _, new_b, _ = jax.lax.while_loop(cond, body, carry)
  return tokens_bl, lens_b + new_b
