"""What every benchmark shares: the narrowed Qwen3-30B-A3B config, forced CPU devices, timing,
peak RSS and a JSON record that names the commit and the machine."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def narrow_config(layers: int, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                  head_dim: int = 32, moe_intermediate: int = 64, intermediate: int = 384):
  """Qwen3-30B-A3B's structure (vocab 151,936, 128 experts top-8) at a narrow width."""
  from moedistill.model.config import qwen3_30b_a3b
  return dataclasses.replace(
      qwen3_30b_a3b(), num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
      num_key_value_heads=kv_heads, head_dim=head_dim, moe_intermediate_size=moe_intermediate,
      intermediate_size=intermediate)


def tiny_config(layers: int):
  """A small MoE of the same family for smoke runs."""
  from moedistill.model.config import ModelConfig
  return ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)


def force_cpu_devices(n: int) -> None:
  """N CPU devices for jax; call before jax is imported anywhere."""
  flag = f"--xla_force_host_platform_device_count={n}"
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flag]).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def flops_per_token(num_layers, hidden, heads, kv_heads, head_dim, experts, k, moe_inter, vocab,
                    seq):
  """Model FLOPs of one forward token (MoE: active experts only); the same formula for the
  JAX and the PyTorch side so their ratios compare like with like."""
  attn_proj = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
  moe_f = k * 3 * hidden * moe_inter + hidden * experts
  per_layer = 2 * (attn_proj + moe_f) + 2 * heads * head_dim * seq
  return num_layers * per_layer + 2 * hidden * vocab


def timed(fn, reps: int, sync=lambda out: out) -> float:
  """Seconds per call after one warm-up call (compilation excluded)."""
  sync(fn())
  t = time.perf_counter()
  out = None
  for _ in range(reps):
    out = fn()
  sync(out)
  return (time.perf_counter() - t) / reps


def peak_rss_gib(who=resource.RUSAGE_SELF) -> float:
  return round(resource.getrusage(who).ru_maxrss / 2**20, 2)  # ru_maxrss is KiB on Linux


def machine() -> dict:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO).stdout.strip() or "unknown"
  dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                              capture_output=True, text=True, cwd=REPO).stdout.strip())
  return {"commit": commit + ("+dirty" if dirty else ""), "host_cpus": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version()}


def emit(name: str, result: dict, out: str = "") -> dict:
  """Prints one JSON object (the benchmark's name, its figures, the commit and the machine)
  as the last line of stdout, and writes it to `out` when given."""
  record = {"benchmark": name, **result, "machine": machine()}
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    Path(out).write_text(line + "\n")
  return record


def checkpoint_config(layers: int, experts: int, hidden: int, moe_intermediate: int):
  """The narrowed Qwen3-30B-A3B with `experts` experts (4 / 2 heads of 64, dense width
  4 x hidden): the checkpoints the load and export benchmarks write."""
  return dataclasses.replace(
      narrow_config(layers, hidden=hidden, heads=4, kv_heads=2, head_dim=64,
                    moe_intermediate=moe_intermediate, intermediate=4 * hidden),
      num_experts=experts)


def write_checkpoint(path: Path, cfg, comp=None, shard_bytes: int = 512 << 20) -> dict:
  """A random bf16 checkpoint of `cfg` (HF layout; native shared-core keys with `comp`),
  generated tensor by tensor into shards plus an index, so the writer holds one tensor at a
  time. Returns sizes: total bytes, largest tensor, shards."""
  import ml_dtypes
  import numpy as np
  from flax import nnx
  from moedistill.hub import hf, safetensors_io as st
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  abstract = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), compression=comp))
  shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  table = [(e.hf_key, hf._hf_shape(e, shapes[e.path])) for e in hf.key_table(cfg, comp)]
  shards, size = [[]], 0
  for key, shape in table:
    n = int(np.prod(shape)) * 2
    if shards[-1] and size + n > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, shape))
    size += n
  path.mkdir(parents=True)
  rng, weight_map = np.random.default_rng(0), {}
  for i, group in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    st.write(path / name, {k: (rng.standard_normal(s, np.float32) * 0.02).astype(
        ml_dtypes.bfloat16) for k, s in group})
    weight_map.update({k: name for k, _ in group})
  sizes = [int(np.prod(s)) * 2 for _, s in table]
  (path / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                           "weight_map": weight_map}))
  raw = {**cfg.to_hf_dict(), "torch_dtype": "bfloat16"}
  if comp is not None:
    raw["compression"] = comp.to_dict()
  (path / "config.json").write_text(json.dumps(raw))
  return {"bytes": sum(sizes), "largest_tensor": max(sizes), "shards": len(shards)}


def host_rss_child_env() -> dict:
  """Environment of a child process that measures its own host RSS: this repository's
  moedistill, one CPU device, no forced device count inherited."""
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="",
              PYTHONWARNINGS="ignore")


def demo_config(arg: str = ""):
  """configs/two_stage.py's ConfigDict (`arg`: its variant, e.g. 'qwen3_30b_a3b'), to override
  and pass to moedistill.config.job_from_config."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("two_stage", REPO / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)
