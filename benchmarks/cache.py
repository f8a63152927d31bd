"""Teacher-cache throughput and size: tokens/s and bytes/token on disk, per case and format
in one run (the plain format is the baseline the others are read against).

  python -m benchmarks.cache --rows=128
  python -m benchmarks.cache --cases=vocab151936 --formats=plain,packed,sampled12,sampled32 \
      --logit_std=3

Cases (random weights, random token rows, one process, all local devices; `--teacher=DIR`
with `--cases=teacher`: that checkpoint, k=--k, random token rows or, with --text=FILE.jsonl,
that text through the checkpoint's tokenizer.json):
  tiny         the embedded demo teacher's shape (moedistill/assets/tiny_teacher), k=32
  vocab151936  Qwen3's vocab (151936) on a small body (hidden 256, 2 layers, 8 experts), k=64
Formats (docs/cache_format.md): plain (int32 ids, bf16 logits), packed (cache.format=packed),
sampledN (cache.mode=sampled, N draws, one temperature).
--logit_std=S scales the lm_head so the teacher's logits have standard deviation S (a random
init's are nearly flat, so its top-k log-probs are all near 0 and code to almost nothing; a
trained LM's spread is a few nats). Ids of a random teacher are spread evenly over the vocab:
the id stream's worst case (a trained teacher's top ids cluster among frequent tokens).
--project_vocab=V: also the bytes with the id stream projected to a vocab of V: each
Rice-coded gap of a k-id row is about log2(gap) + 1.5 bits and stretching the ids by V / V0
(V0 the case's vocab) stretches every gap alike, so k log2(V / V0) / 8 bytes per token are
added to the measured id stream (packed_ids + rice_b).
tokens/s excludes the first (compiling) step. Per array bytes on disk in `arrays`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("rows", 64, "token rows cached")
flags.DEFINE_integer("seq_len", 128, "tokens per row")
flags.DEFINE_list("cases", ["tiny", "vocab151936"], "tiny, vocab151936, teacher (--teacher)")
flags.DEFINE_list("formats", ["plain"], "plain, packed, sampledN")
flags.DEFINE_float("logit_std", 0.0, "scale the random teacher's logits to this std (0: as "
                   "initialised)")
flags.DEFINE_integer("project_vocab", 0, "also project the id stream's bytes to this vocab")
flags.DEFINE_string("teacher", "", "case teacher: a checkpoint directory")
flags.DEFINE_integer("k", 64, "case teacher: cached top-k")
flags.DEFINE_string("text", "", "case teacher: a jsonl of {'text': ...} rows")
flags.DEFINE_bool("smoke", False, "case tiny, plain and packed, 32 x 32 tokens (a test of the "
                  "script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

ASSETS = common.REPO / "moedistill" / "assets" / "tiny_teacher"


def case_config(name):
  from moedistill.model.config import ModelConfig
  if name == "teacher":
    return ModelConfig.from_json_file(Path(F.teacher) / "config.json"), F.k
  if name == "tiny":
    return ModelConfig.from_json_file(ASSETS / "config.json"), 32
  return ModelConfig(vocab_size=151936, hidden_size=256, intermediate_size=512,
                     moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=True), 64


def dir_bytes(path) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_teacher(name, tmp: Path, logit_std: float) -> Path:
  import jax.numpy as jnp
  from flax import nnx
  from moedistill.hub import hf
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  cfg, _ = case_config(name)
  if name == "teacher":
    return Path(F.teacher)
  teacher_dir = tmp / f"{name}_teacher"
  if teacher_dir.exists():
    return teacher_dir
  model = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0))
  if logit_std:
    h, _ = model.hidden(jnp.asarray(np.arange(256).reshape(2, 128) % cfg.vocab_size,
                                    jnp.int32), jnp.ones((2, 128), jnp.int32))
    z = h.reshape(-1, h.shape[-1]) @ model.lm_head_kernel()
    scale = logit_std / float(jnp.std(z))
    if model.lm_head is None:  # tied: the embedding too (the body's RMSNorm undoes it there)
      model.embed_tokens.embedding.value = model.embed_tokens.embedding.value * scale
    else:
      model.lm_head.kernel.value = model.lm_head.kernel.value * scale
  hf.save_model(model, teacher_dir)
  return teacher_dir


def token_rows(name, cfg, r, rows_n, seq_len):
  """Random ids; for case `teacher` with --text, that jsonl's "text" through the teacher's
  tokenizer (tokenizer.json), concatenated and cut into rows."""
  if name != "teacher" or not F.text:
    return r.integers(0, cfg.vocab_size, (rows_n, seq_len)).astype(np.int32)
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(Path(F.teacher) / "tokenizer.json"))
  ids = []
  for line in open(F.text):
    ids += tok.encode(json.loads(line)["text"]).ids
    if len(ids) >= rows_n * seq_len:
      break
  if len(ids) < rows_n * seq_len:
    raise SystemExit(f"--text={F.text}: {len(ids)} tokens, need {rows_n * seq_len}")
  return np.asarray(ids[:rows_n * seq_len], np.int32).reshape(rows_n, seq_len)


def added_kl(plain_path, packed_path, temperature=1.0, rows=16):
  """Mean and max over tokens of KL(plain-decoded || packed-decoded) at T, each a top-k plus
  an evenly spread tail (data/topk_codec.py): both have the same tail spread, so it is the
  KL of the bucketed distributions {each top-k id, tail}. Plain's bf16 logits stand in for
  the exact teacher (within bf16 rounding); positions whose top-k id sets differ (ties at
  rank k) are left out and counted."""
  from moedistill.data import cache
  plain_path, packed_path = str(plain_path), str(packed_path)
  a, b = (cache.CacheReader(x).read_rows(np.arange(rows)) for x in (plain_path, packed_path))
  j = cache.CacheReader(plain_path).temperature_index(temperature)
  k = a["topk_idx"].shape[-1]
  ia, ib = (np.argsort(x["topk_idx"].reshape(-1, k), 1) for x in (a, b))
  ids_a = np.take_along_axis(a["topk_idx"].reshape(-1, k), ia, 1)
  ids_b = np.take_along_axis(b["topk_idx"].reshape(-1, k), ib, 1)
  same = (ids_a == ids_b).all(1)
  lp = [np.take_along_axis(x["topk_logit"].reshape(-1, k).astype(np.float64), i, 1)
        / temperature - x["lse"].reshape(-1, x["lse"].shape[-1])[:, j:j + 1]
        for x, i in ((a, ia), (b, ib))]
  p, q = np.exp(lp[0]), np.exp(lp[1])
  tp, tq = np.clip(1 - p.sum(1), 1e-300, 1), np.clip(1 - q.sum(1), 1e-300, 1)
  kl = (p * (lp[0] - lp[1])).sum(1) + tp * (np.log(tp) - np.log(tq))
  return {"mean": float(kl[same].mean()), "max": float(kl[same].max()),
          "positions": int(same.sum()), "left_out_ties": int((~same).sum())}


def run_case(name, rows_n, seq_len, tmp: Path, fmt: str = "plain", logit_std: float = 0.0,
             project_vocab: int = 0):
  from configs.two_stage import get_config
  from moedistill.cache_logits import build_cache
  from moedistill.config import job_from_config
  from moedistill.data import tokens
  cfg, k = case_config(name)
  teacher_dir = make_teacher(name, tmp, logit_std)
  r = np.random.default_rng(0)
  c = get_config()
  c.teacher, c.workdir = str(teacher_dir), str(tmp / f"{name}_{fmt}")
  c.data.seq_len, c.cache.k = seq_len, k
  c.cache.rows_per_chunk, c.cache.chunks_per_step = 8, 2
  if fmt == "packed":
    c.cache.format = "packed"
  elif fmt.startswith("sampled"):
    c.cache.mode, c.cache.samples, c.cache.temperatures = "sampled", int(fmt[7:]), [1.0]
    c.train.kd_mode = "sampled"
  job = job_from_config(c)
  tmeta = tokens.write_rows(job.cache_path("train"),
                            token_rows(name, cfg, r, rows_n, seq_len),
                            np.ones((rows_n, seq_len), np.int32), rows_per_chunk=8,
                            codec=job.cache.codec, fingerprint=f"bench-{name}",
                            tokenizer_hash="none")
  t0 = time.time()
  path = build_cache(job, "train", tokens_meta=tmeta, progress=False)
  dt = time.time() - t0
  n_tokens = rows_n * seq_len
  meta = json.loads((Path(path) / "metadata.json").read_text())
  arrays = {d.name: round(dir_bytes(d) / n_tokens, 2) for d in sorted(Path(path).iterdir())
            if d.is_dir()}
  per_token = dir_bytes(path) / n_tokens
  out = dict(case=name, format=fmt, vocab=cfg.vocab_size, k=k, rows=rows_n, seq_len=seq_len,
             logit_std=logit_std, tokens_per_s=meta["stats"]["tokens_per_s_after_first_step"],
             seconds_total_with_compile=round(dt, 2),
             bytes_per_token=round(per_token, 1),
             bytes_per_token_metadata=meta["stats"].get("bytes_per_token_disk"),
             bytes_per_token_raw=meta["bytes_per_token_raw"], arrays=arrays)
  if not fmt.startswith("sampled"):
    out["bytes_per_entry"] = round(per_token / k, 3)
    if fmt == "packed":
      from moedistill.data import cache
      from moedistill.data.topk_codec import STEP
      rows = cache.CacheReader(path).read_rows(np.arange(min(rows_n, 16)))
      out["teacher_topk_mass_T1"] = round(float(np.exp(
          rows["topk_logit"].astype(np.float64) - rows["lse"][..., :1]).sum(-1).mean()), 4)
      out["added_kl_bound_T1"] = STEP ** 2 / 8
  if project_vocab and project_vocab != cfg.vocab_size and "packed_ids" in arrays:
    extra = (k if not fmt.startswith("sampled") else int(fmt[7:])) * np.log2(
        project_vocab / cfg.vocab_size) / 8
    out["projected"] = {"vocab": project_vocab,
                        "bytes_per_token": round(per_token + extra, 1),
                        "bytes_per_entry": round((per_token + extra) / k, 3)}
  return out


def main(argv):
  del argv
  if F.smoke:
    F.cases, F.formats, F.rows, F.seq_len = ["tiny"], ["plain", "packed"], 32, 32
  import jax
  res = {"backend": jax.default_backend(), "devices": jax.device_count(),
         "cpu_count": os.cpu_count(), "cases": []}
  with tempfile.TemporaryDirectory() as tmp:
    for name in F.cases:
      for fmt in F.formats:
        res["cases"].append(run_case(name, F.rows, F.seq_len, Path(tmp), fmt, F.logit_std,
                                     F.project_vocab))
      done = {c["format"]: c for c in res["cases"] if c["case"] == name}
      if "plain" in done and "packed" in done:
        done["packed"]["added_kl_vs_plain_T1"] = added_kl(
            Path(tmp) / f"{name}_plain" / "cache" / "train",
            Path(tmp) / f"{name}_packed" / "cache" / "train")
  common.emit("cache", res, F.out)


if __name__ == "__main__":
  app.run(main)
