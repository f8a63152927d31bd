"""The PyTorch baseline: Hugging Face `transformers`' Qwen3-MoE doing our two jobs the way a
plain PyTorch script would, so `benchmarks.speed` can report ratios against it in one run.

1. teacher caching: forward, full-vocab logits, top-k and logsumexp, copied to the host;
2. a KD train step: full-vocab student logits, the teacher's top-k scattered back into a
   full-vocab tensor, L = (1-a) CE + a T^2 KL (batchmean), AdamW.
Random bf16 weights; the MoE experts run with each `--impls` entry of transformers'
experts implementations (the first one trains).

  python -m benchmarks.torch_baseline --size=narrow --layers=2 --train_layers=2
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import common

flags.DEFINE_enum("size", "full", ["tiny", "narrow", "full"],
                  "tiny: a small MoE; narrow: Qwen3-30B-A3B's structure at hidden 128 "
                  "(2 x 512 tokens, CPU); full: its layer shape (8 x 2048 tokens, GPU)")
flags.DEFINE_integer("layers", 8, "decoder layers of the caching model")
flags.DEFINE_integer("train_layers", 4, "decoder layers of the trained model")
flags.DEFINE_list("impls", ["grouped_mm", "eager"], "transformers experts implementations")
flags.DEFINE_bool("smoke", False, "tiny shapes, one layer (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

# (rows, tokens per row, top-k, timed repetitions) per size, for caching and training.
SHAPES = {"tiny": ((2, 64, 16), (2, 64), 2), "narrow": ((2, 512, 64), (2, 512), 3),
          "full": ((8, 2048, 64), (4, 2048), 5)}


def hf_model(cfg, device, impl):
  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  hf_cfg = Qwen3MoeConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                             if k not in ("architectures", "model_type", "torch_dtype")})
  with torch.device(device):
    model = Qwen3MoeForCausalLM(hf_cfg).to(torch.bfloat16)
  model.set_experts_implementation(impl)
  return model


def config(layers):
  return common.tiny_config(layers) if F.size == "tiny" else common.narrow_config(layers) \
      if F.size == "narrow" else common.narrow_config(layers, 2048, 32, 4, 128, 768, 6144)


def model_flops(cfg, seq):
  return common.flops_per_token(cfg.num_hidden_layers, cfg.hidden_size,
                                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                cfg.num_experts, cfg.num_experts_per_tok,
                                cfg.moe_intermediate_size, cfg.vocab_size, seq)


def bench_cache(impl, device, sync):
  import torch
  (b, t, k), _, reps = SHAPES[F.size]
  cfg = config(F.layers)
  model = hf_model(cfg, device, impl).eval()
  x = torch.randint(0, cfg.vocab_size, (b, t), device=device)

  def step():
    with torch.no_grad():
      logits = model(input_ids=x).logits.float()
      values, ids = torch.topk(logits, k, dim=-1)
      lse = torch.logsumexp(logits, dim=-1)
      return values.to(torch.float16).cpu(), ids.to(torch.int32).cpu(), lse.cpu()

  tps = b * t / common.timed(step, reps, sync)
  return {"tokens_per_s": round(tps), "tflops": round(tps * model_flops(cfg, t) / 1e12, 2),
          "layers": F.layers, "batch": [b, t], "topk": k}


def bench_train(impl, device, sync):
  import torch
  import torch.nn.functional as tf
  (_, _, k), (b, t), reps = SHAPES[F.size]
  cfg = config(F.train_layers)
  model = hf_model(cfg, device, impl).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
  x = torch.randint(0, cfg.vocab_size, (b, t), device=device)
  top_v = torch.randn(b, t, k, device=device).sort(-1, descending=True).values
  top_i = torch.randint(0, cfg.vocab_size, (b, t, k), device=device)
  alpha, temp, vocab = 0.5, 2.0, cfg.vocab_size

  def step():
    logits = model(input_ids=x).logits.float()
    ce = tf.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
    teacher = torch.full_like(logits, -1e4).scatter(-1, top_i, top_v)
    kl = tf.kl_div(tf.log_softmax(logits / temp, -1).view(-1, vocab),
                   tf.softmax(teacher / temp, -1).view(-1, vocab), reduction="batchmean")
    loss = (1 - alpha) * ce + alpha * temp * temp * kl
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  tps = b * t / common.timed(step, reps, sync)
  peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
  return {"impl": impl, "tokens_per_s": round(tps),
          "tflops": round(tps * 3 * model_flops(cfg, t) / 1e12, 2), "layers": F.train_layers,
          "batch": [b, t], "peak_mem_gib": peak}


def main(argv):
  del argv
  import torch
  if F.smoke:
    F.size, F.layers, F.train_layers = "tiny", 1, 1
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: out)
  result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "size": F.size}
  for impl in F.impls:
    result[f"cache_{impl}"] = bench_cache(impl, device, sync)
  result["train_seed_style"] = bench_train(F.impls[0], device, sync)
  result["peak_rss_gib"] = common.peak_rss_gib()
  common.emit("torch_baseline", result, F.out)


if __name__ == "__main__":
  app.run(main)
