"""Speed against the PyTorch baseline, in one run: teacher caching tokens/s (forward, vocab
top-k and logsumexp, to the host), the KD train step's tokens/s (fused loss, AdamW) and the MoE
FFN alone per backend (forward and forward+backward), then `benchmarks.torch_baseline` on the
same shapes in a child process, and our/baseline ratios. FLOPs are model FLOPs with the
baseline's formula (MoE: active experts only).

  python -m benchmarks.speed --size=narrow --layers=2 --train_layers=2 --baseline   # CPU
  python -m benchmarks.speed --baseline                                              # one GPU
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import common

flags.DEFINE_enum("size", "full", ["tiny", "narrow", "full"],
                  "tiny: a small MoE; narrow: Qwen3-30B-A3B's structure at hidden 128, 2 x 512 "
                  "tokens (CPU); full: its layer shape, 8 x 2048 tokens (GPU)")
flags.DEFINE_integer("layers", 8, "decoder layers of the caching model")
flags.DEFINE_integer("train_layers", 4, "decoder layers of the trained model")
flags.DEFINE_string("backend", "auto", "MoE backend of the caching and train benchmarks")
flags.DEFINE_list("moe_backends", [], "backends of the MoE-alone benchmark (default: "
                  "pallas,ragged on GPU, sorted,ragged elsewhere)")
flags.DEFINE_string("dtype", "bfloat16", "weights and compute (the baseline's: bfloat16)")
flags.DEFINE_integer("vocab_chunk", 8192, "vocab chunk of the scans")
flags.DEFINE_bool("baseline", False, "also run benchmarks.torch_baseline and report ratios")
flags.DEFINE_list("baseline_impls", [], "the baseline's --impls (its first one trains)")
flags.DEFINE_bool("smoke", False, "tiny shapes, one layer (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

# Per size: cache (rows, seq, top-k), train (rows, seq, top-k), MoE-alone tokens, repetitions.
SIZES = {"full": ((8, 2048, 64), (4, 2048, 64), 16384, 5),
         "narrow": ((2, 512, 64), (2, 512, 64), 1024, 3),
         "tiny": ((2, 64, 16), (2, 64, 16), 512, 2)}


def config(layers):
  if F.size == "tiny":
    return common.tiny_config(layers)
  if F.size == "narrow":
    return common.narrow_config(layers)
  return common.narrow_config(layers, 2048, 32, 4, 128, 768, 6144)


def model_flops(c, seq):
  return common.flops_per_token(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                c.num_key_value_heads, c.head_dim, c.num_experts,
                                c.num_experts_per_tok, c.moe_intermediate_size, c.vocab_size,
                                seq)


def model(c, backend, dtype):
  from flax import nnx
  from moedistill.model.layers import Runtime
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  rt = Runtime(dtype=dtype, param_dtype=dtype, moe_backend=backend)
  return Qwen3MoeForCausalLM(c, rngs=nnx.Rngs(0), runtime=rt)


def bench_cache(backend, dtype):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from moedistill.training.vocab_scan import topk_lse
  c = config(F.layers)
  (b, t, k), _, _, reps = SIZES[F.size]
  g, st = nnx.split(model(c, backend, dtype))

  @jax.jit
  def fwd(st, x):
    m = nnx.merge(g, st)
    h, _ = m.hidden(x)
    return topk_lse(h.reshape(b * t, -1), m.lm_head_kernel(), k, (1.0,), F.vocab_chunk)

  x = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (b, t)), jnp.int32)
  tps = b * t / common.timed(lambda: jax.device_get(fwd(st, x)), reps)
  return {"tokens_per_s": round(tps), "tflops": round(tps * model_flops(c, t) / 1e12, 2),
          "layers": F.layers, "batch": [b, t], "topk": k, "moe_backend": backend}


def train_batch(c, b, t, k):
  import jax.numpy as jnp
  import numpy as np
  r = np.random.default_rng(0)
  return {"tokens": jnp.asarray(r.integers(0, c.vocab_size, (b, t)), jnp.int32),
          "segment_ids": jnp.ones((b, t), jnp.int32),
          "topk_idx": jnp.asarray(r.integers(0, c.vocab_size, (b, t, k)), jnp.int32),
          "topk_logit": jnp.asarray(-np.sort(-r.normal(size=(b, t, k)), -1), jnp.bfloat16),
          "lse": jnp.full((b, t, 1), 6.0, jnp.float32)}


def bench_train(backend, dtype):
  import jax
  from moedistill.config import Group, Stage, TrainConfig
  from moedistill.training import param_tree
  from moedistill.training.optim import build
  from moedistill.training.train_step import StepConfig, make_train_step
  c = config(F.train_layers)
  _, (b, t, k), _, reps = SIZES[F.size]
  g, template, params = param_tree.split(model(c, backend, dtype))
  stage = Stage(name="all", steps=10, epochs=0.0, groups=(Group(".*", 1.0, None),), lr=1e-5,
                alpha=0.5, temperature=2.0, warmup_steps=0)
  tc = TrainConfig(batch_size=b, micro_batches=1, kd_mode="bucket", vocab_chunk=F.vocab_chunk,
                   schedule="constant", min_lr_ratio=1.0, weight_decay=0.0, clip_norm=0.0,
                   b1=0.9, b2=0.999, checkpoint_every=10, keep=1, log_every=1, stages=(stage,))
  tx, _, _ = build(stage, tc, {p: v.shape for p, v in params.items()}, 10)
  sc = StepConfig(0.5, 2.0, "bucket", 0, F.vocab_chunk, 1, c.router_aux_loss_coef,
                  c.num_experts_per_tok)
  step = jax.jit(make_train_step(g, template, tx, sc), donate_argnums=(0, 2))
  batch, state = train_batch(c, b, t, k), {"p": params, "o": tx.init(params)}

  def run():
    state["p"], state["o"], metrics = step(state["p"], {}, state["o"], batch)
    return metrics["loss"]

  tps = b * t / common.timed(run, reps, jax.block_until_ready)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return {"tokens_per_s": round(tps), "tflops": round(tps * 3 * model_flops(c, t) / 1e12, 2),
          "layers": F.train_layers, "batch": [b, t], "moe_backend": backend,
          "peak_mem_gib": round(peak / 2**30, 2) if peak else None}


def bench_moe(backend, dtype):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moedistill.model import moe
  c = config(1)
  _, _, n, reps = SIZES[F.size]
  d, f, e, kk = c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(n, d)), dtype)
  router = jnp.asarray(r.normal(size=(d, e)) * 0.02, jnp.float32)
  w = [jnp.asarray(r.normal(size=s) * 0.02, dtype) for s in ((e, d, f),) * 2 + ((e, f, d),)]

  def loss(x, w):
    _, wts, ex = moe.route(x, router, kk, True)
    disp = moe.make_dispatch(backend, ex, wts, e, 1.25)
    return jnp.sum(moe.expert_ffn(disp, x, *w).astype(jnp.float32))

  f_fwd, f_bwd = jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))
  flops = 2 * 3 * n * kk * d * f
  t_f = common.timed(lambda: f_fwd(x, w), 2 * reps, jax.block_until_ready)
  t_b = common.timed(lambda: f_bwd(x, w), 2 * reps, jax.block_until_ready)
  return {"fwd_ms": round(t_f * 1e3, 2), "fwd_bwd_ms": round(t_b * 1e3, 2),
          "fwd_tflops": round(flops / t_f / 1e12, 3),
          "fwd_bwd_tflops": round(3 * flops / t_b / 1e12, 3), "tokens": n}


def run_baseline():
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp, "baseline.json")
    cmd = [sys.executable, "-m", "benchmarks.torch_baseline", f"--size={F.size}",
           f"--layers={F.layers}", f"--train_layers={F.train_layers}", f"--out={out}"]
    if F.baseline_impls:
      cmd.append(f"--impls={','.join(F.baseline_impls)}")
    subprocess.run(cmd, check=True, cwd=common.REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def ratios(res, base):
  best_cache = max((v["tokens_per_s"] for key, v in base.items()
                    if key.startswith("cache_") and isinstance(v, dict)), default=None)
  train = base.get("train_seed_style", {})
  mem = train.get("peak_mem_gib") and res["train"]["peak_mem_gib"]
  return {"cache_tokens_per_s": round(res["cache"]["tokens_per_s"] / best_cache, 2)
          if best_cache else None,
          "train_tokens_per_s": round(res["train"]["tokens_per_s"] / train["tokens_per_s"], 2)
          if train else None,
          "train_peak_mem": round(res["train"]["peak_mem_gib"] / train["peak_mem_gib"], 2)
          if mem else None}


def main(argv):
  del argv
  if F.smoke:
    F.size, F.layers, F.train_layers = "tiny", 1, 1
  import jax
  import jax.numpy as jnp
  from moedistill.model import moe
  dtype = jnp.dtype(F.dtype)
  backend = moe.resolve_backend(F.backend)
  dev = jax.devices()[0]
  res = {"device": dev.device_kind, "jax": jax.__version__, "size": F.size,
         "cache": bench_cache(backend, dtype), "train": bench_train(backend, dtype), "moe": {}}
  for be in F.moe_backends or (["pallas", "ragged"] if dev.platform == "gpu"
                               else ["sorted", "ragged"]):
    res["moe"][be] = bench_moe(be, dtype)
  res["peak_rss_gib"] = common.peak_rss_gib()
  if F.baseline:
    res["baseline"] = run_baseline()
    res["baseline_peak_rss_gib"] = common.peak_rss_gib(resource.RUSAGE_CHILDREN)
    res["ratios"] = ratios(res, res["baseline"])
  common.emit("speed", res, F.out)


if __name__ == "__main__":
  app.run(main)
