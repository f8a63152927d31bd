"""Benchmark at the Qwen3-30B-A3B layer shape (random weights), against the PyTorch anchor.

Usage (one GPU):  python scripts/bench.py --anchor ../shared/bench/anchor_hf_torch.py
  (CPU, Qwen3-30B-A3B's structure at hidden 128: vocab 151936, 128 experts top-8, 2x512 tokens):
                  python scripts/bench.py --narrow --layers 2 --train-layers 2 --anchor ...
                  (what ../shared/bench/cpu_side_by_side.sh runs)
          (CPU smoke test):  python scripts/bench.py --tiny
Reports JSON: teacher caching tokens/s and TFLOP/s (N layers, 8x2048, top-64, to host);
KD train step tokens/s, TFLOP/s and peak memory (4 layers, 4x2048, bf16, AdamW, fused loss);
the MoE FFN alone per backend (forward+backward TFLOP/s, active experts only). With --anchor
it runs the PyTorch baseline in the same process tree and prints our/baseline ratios.
FLOPs are model FLOPs with the anchor's formula (MoE counts only active experts).
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moedistill.config import Group, Stage, TrainConfig  # noqa: E402
from moedistill.model import moe  # noqa: E402
from moedistill.model.config import ModelConfig  # noqa: E402
from moedistill.model.layers import Runtime  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402
from moedistill.training import param_tree as P  # noqa: E402
from moedistill.training.optim import build  # noqa: E402
from moedistill.training.train_step import StepConfig, make_train_step  # noqa: E402
from moedistill.training.vocab_scan import topk_lse  # noqa: E402


# Per size: cache (batch, seq, top-k), train (batch, seq, top-k), MoE-alone tokens, timed reps.
SIZES = {"full": ((8, 2048, 64), (4, 2048, 64), 16384, 5),
         "narrow": ((2, 512, 64), (2, 512, 64), 1024, 3),
         "tiny": ((2, 64, 16), (2, 64, 16), 512, 2)}


def shape(layers, size):
  if size == "tiny":
    return ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                       moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
  if size == "narrow":  # the anchor's --narrow
    return ModelConfig(vocab_size=151936, hidden_size=128, intermediate_size=384,
                       moe_intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, num_experts=128, num_experts_per_tok=8,
                       norm_topk_prob=True)
  return ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_hidden_layers=layers, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True)


def flops_per_token(c: ModelConfig, seq):  # the anchor's formula
  d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
  attn_proj = d * (h * hd) * 2 + d * (kv * hd) * 2
  moe_f = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size + d * c.num_experts
  return c.num_hidden_layers * (2 * (attn_proj + moe_f) + 2 * h * hd * seq) + 2 * d * c.vocab_size


def timed(fn, n):
  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n


def model(c, backend, dtype):  # bf16 weights and compute by default, as the anchor
  rt = Runtime(dtype=dtype, param_dtype=dtype, moe_backend=backend)
  return Qwen3MoeForCausalLM(c, rngs=nnx.Rngs(0), runtime=rt)


def bench_cache(a, backend):
  c = shape(a.layers, a.size)
  (b, t, k), _, _, reps = SIZES[a.size]
  g, st = nnx.split(model(c, backend, a.dtype))

  @jax.jit
  def fwd(st, x):
    m = nnx.merge(g, st)
    h, _ = m.hidden(x)
    return topk_lse(h.reshape(b * t, -1), m.lm_head_kernel(), k, (1.0,), a.vocab_chunk)

  x = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (b, t)), jnp.int32)
  dt = timed(lambda: jax.device_get(fwd(st, x)), reps)  # to host, as the anchor
  tps = b * t / dt
  return {"tokens_per_s": round(tps), "tflops": round(tps * flops_per_token(c, t) / 1e12, 1),
          "layers": a.layers, "batch": [b, t], "topk": k, "moe_backend": backend}


def bench_train(a, backend):
  c = shape(a.train_layers, a.size)
  _, (b, t, k), _, reps = SIZES[a.size]
  g, template, params = P.split(model(c, backend, a.dtype))
  stage = Stage("all", 10, 0.0, (Group(".*", 1.0, None),), 1e-5, 0.5, 2.0, 0)
  tc = TrainConfig(b, 1, "bucket", 8192, "constant", 1.0, 0.0, 0.0, 0.9, 0.999, 10, 1, 1,
                   (stage,))
  tx, _, _ = build(stage, tc, {p: v.shape for p, v in params.items()}, 10)
  sc = StepConfig(0.5, 2.0, "bucket", 0, 8192, 1, c.router_aux_loss_coef,
                  c.num_experts_per_tok)
  step = jax.jit(make_train_step(g, template, tx, sc), donate_argnums=(0, 2))
  r = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(r.integers(0, c.vocab_size, (b, t)), jnp.int32),
           "segment_ids": jnp.ones((b, t), jnp.int32),
           "topk_idx": jnp.asarray(r.integers(0, c.vocab_size, (b, t, k)), jnp.int32),
           "topk_logit": jnp.asarray(-np.sort(-r.normal(size=(b, t, k)), -1), jnp.bfloat16),
           "lse": jnp.full((b, t, 1), 6.0, jnp.float32)}
  state = {"p": params, "o": tx.init(params)}

  def run():
    state["p"], state["o"], m = step(state["p"], {}, state["o"], batch)
    return m["loss"]

  dt = timed(run, reps)
  tps = b * t / dt
  stats = jax.devices()[0].memory_stats() or {}
  return {"tokens_per_s": round(tps), "tflops": round(tps * 3 * flops_per_token(c, t) / 1e12, 1),
          "layers": a.train_layers, "batch": [b, t], "moe_backend": backend,
          "peak_mem_gib": round(stats["peak_bytes_in_use"] / 2**30, 1)
          if "peak_bytes_in_use" in stats else None}


def bench_moe(a, backend):
  c = shape(1, a.size)
  _, _, n, reps = SIZES[a.size]
  d, f, e, kk = c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(n, d)), a.dtype)
  router = jnp.asarray(r.normal(size=(d, e)) * 0.02, jnp.float32)
  w = [jnp.asarray(r.normal(size=s) * 0.02, a.dtype) for s in ((e, d, f),) * 2 + ((e, f, d),)]

  def loss(x, w):
    _, wts, ex = moe.route(x, router, kk, True)
    disp = moe.make_dispatch(backend, ex, wts, e, 1.25)
    return jnp.sum(moe.expert_ffn(disp, x, *w).astype(jnp.float32))

  f_fwd = jax.jit(loss)
  f_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  flops = 2 * 3 * n * kk * d * f
  t_f = timed(lambda: f_fwd(x, w), 2 * reps)
  t_b = timed(lambda: f_bwd(x, w), 2 * reps)
  return {"fwd_ms": round(t_f * 1e3, 2), "fwd_bwd_ms": round(t_b * 1e3, 2),
          "fwd_tflops": round(flops / t_f / 1e12, 3),
          "fwd_bwd_tflops": round(3 * flops / t_b / 1e12, 3), "tokens": n}


def run_anchor(a):
  cmd = [sys.executable, a.anchor, "--layers", str(a.layers), "--train-layers",
         str(a.train_layers)]
  if a.size != "full":
    cmd.append(f"--{a.size}")
  if a.anchor_impls:
    cmd += ["--impls", a.anchor_impls]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  return json.loads(out[out.index("{\n"):])


def peak_rss_gib(who):
  return round(resource.getrusage(who).ru_maxrss / 2**20, 2)  # ru_maxrss is KiB on Linux


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--narrow", action="store_true",
                  help="Qwen3-30B-A3B's structure at hidden 128, 2x512 tokens (CPU)")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--train-layers", type=int, default=4)
  ap.add_argument("--backend", default="auto", help="MoE backend for cache/train")
  ap.add_argument("--moe-backends", default="", help="default: capacity,mgpu,ragged on GPU, "
                  "sorted,ragged,capacity elsewhere")
  ap.add_argument("--dtype", default="bfloat16", help="weights and compute (anchor: bf16)")
  ap.add_argument("--vocab-chunk", type=int, default=8192)
  ap.add_argument("--anchor", default="", help="path of anchor_hf_torch.py to run alongside")
  ap.add_argument("--anchor-impls", default="",
                  help="the anchor's --impls (its first one trains); default: the anchor's")
  a = ap.parse_args()
  a.size = "tiny" if a.tiny else "narrow" if a.narrow else "full"
  a.dtype = jnp.dtype(a.dtype)
  backend = moe.resolve_backend(a.backend)
  dev = jax.devices()[0]
  default_moe = "capacity,mgpu,ragged" if dev.platform == "gpu" else "sorted,ragged,capacity"
  res = {"device": dev.device_kind, "jax": jax.__version__, "size": a.size,
         "cache": bench_cache(a, backend), "train": bench_train(a, backend), "moe": {}}
  for be in (a.moe_backends or default_moe).split(","):
    try:
      res["moe"][be] = bench_moe(a, be)
    except Exception as e:  # noqa: BLE001 - a backend may not exist on this device
      res["moe"][be] = f"failed: {type(e).__name__}: {str(e)[:200]}"
  res["peak_rss_gib"] = peak_rss_gib(resource.RUSAGE_SELF)
  if a.anchor:
    anc = run_anchor(a)
    res["anchor"] = anc
    res["anchor_peak_rss_gib"] = peak_rss_gib(resource.RUSAGE_CHILDREN)
    base_c = max((v["tokens_per_s"] for k, v in anc.items()
                  if k.startswith("cache_") and isinstance(v, dict)), default=None)
    base_t = anc.get("train_seed_style", {})
    res["ratios"] = {
        "cache_tokens_per_s": round(res["cache"]["tokens_per_s"] / base_c, 2) if base_c else None,
        "train_tokens_per_s": round(res["train"]["tokens_per_s"] / base_t["tokens_per_s"], 2)
        if base_t else None,
        "train_peak_mem": round(res["train"]["peak_mem_gib"] / base_t["peak_mem_gib"], 2)
        if base_t.get("peak_mem_gib") and res["train"]["peak_mem_gib"] else None}
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
