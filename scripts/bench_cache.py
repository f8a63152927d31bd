"""Teacher-cache throughput and size: tokens/s and bytes/token on disk.

Usage: python scripts/bench_cache.py [--rows 64] [--seq_len 128] [--cases tiny,vocab151936]
Cases (random weights, random token rows, one process, all local devices):
  tiny         the embedded demo teacher's shape (moedistill/assets/tiny_teacher), k=32
  vocab151936  Qwen3's vocab (151936) on a small body (hidden 256, 2 layers, 8 experts), k=64
tokens/s excludes the first (compiling) step. Prints JSON.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from configs.two_stage import get_config  # noqa: E402
from moedistill.cache_logits import build_cache  # noqa: E402
from moedistill.config import job_from_config  # noqa: E402
from moedistill.data import tokens  # noqa: E402
from moedistill.hub import hf  # noqa: E402
from moedistill.model.config import ModelConfig  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "moedistill" / "assets" / "tiny_teacher"


def case_config(name) -> tuple[ModelConfig, int]:
  if name == "tiny":
    return ModelConfig.from_json_file(ASSETS / "config.json"), 32
  return ModelConfig(vocab_size=151936, hidden_size=256, intermediate_size=512,
                     moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=True), 64


def dir_bytes(path) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_case(name, rows_n, seq_len, tmp: Path):
  cfg, k = case_config(name)
  teacher_dir = tmp / f"{name}_teacher"
  hf.save_model(Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0)), teacher_dir)
  r = np.random.default_rng(0)
  c = get_config()
  c.teacher, c.workdir = str(teacher_dir), str(tmp / name)
  c.data.seq_len, c.cache.k = seq_len, k
  c.cache.rows_per_chunk, c.cache.chunks_per_step = 8, 2
  job = job_from_config(c)
  tmeta = tokens.write_rows(job.cache_path("train"),
                            r.integers(0, cfg.vocab_size, (rows_n, seq_len)).astype(np.int32),
                            np.ones((rows_n, seq_len), np.int32), rows_per_chunk=8,
                            codec=job.cache.codec, fingerprint=f"bench-{name}",
                            tokenizer_hash="none")
  t0 = time.time()
  path = build_cache(job, "train", tokens_meta=tmeta, progress=False)
  dt = time.time() - t0
  n_tokens = rows_n * seq_len
  meta = json.loads((Path(path) / "metadata.json").read_text())
  return dict(case=name, vocab=cfg.vocab_size, k=k, rows=rows_n, seq_len=seq_len,
              tokens_per_s=meta["stats"]["tokens_per_s_after_first_step"],
              seconds_total_with_compile=round(dt, 2),
              bytes_per_token=round(dir_bytes(path) / n_tokens, 1),
              bytes_per_token_raw=meta["bytes_per_token_raw"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=64)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--cases", default="tiny,vocab151936")
  a = ap.parse_args()
  res = {"backend": jax.default_backend(), "devices": jax.device_count(),
         "cpu_count": os.cpu_count(), "cases": []}
  with tempfile.TemporaryDirectory() as tmp:
    for name in a.cases.split(","):
      res["cases"].append(run_case(name, a.rows, a.seq_len, Path(tmp)))
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
