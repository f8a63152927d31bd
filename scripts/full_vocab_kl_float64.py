"""`evaluate --full_vocab`'s kl_full against an independent float64 NumPy KL on a workdir's eval
cache: dense logits of both models from a plain forward, float64 softmaxes, valid tokens
rebuilt from segment ids. Meant for small vocabularies (it builds [rows, seq, vocab] arrays).

python scripts/full_vocab_kl_float64.py --config=configs/two_stage.py \
    --config.workdir=runs/two_stage [--checkpoint=DIR] [--temperature=1.0]
Prints one JSON line: kl_full (fused, float32), kl_float64, rel_err, tokens.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "student (default: <workdir>/export)")
  flags.DEFINE_float("temperature", 1.0, "a temperature the eval cache holds")


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main(argv):
  import jax.numpy as jnp
  from moedistill.cli import load_job
  from moedistill.data.cache import CacheReader
  from moedistill.hub import hf
  from moedistill.training.held_out import evaluate_model
  job, F = load_job(argv)
  path = F.checkpoint or os.path.join(job.workdir, "export")
  reader = CacheReader(job.cache_path("eval"))
  student, _ = hf.load_model(path, job.model)
  teacher, _ = hf.load_model(job.teacher, job.model)
  fused = evaluate_model(student, reader, temperature=F.temperature, teacher=teacher,
                         vocab_chunk=job.train.vocab_chunk)
  kl_sum, n = 0.0, 0
  for lo in range(0, reader.rows, 8):
    rows = reader.read_rows(np.arange(lo, min(lo + 8, reader.rows)))
    tok, seg = rows["tokens"], rows["segment_ids"]
    zs = np.asarray(student(jnp.asarray(tok), jnp.asarray(seg))[0], np.float64)
    zt = np.asarray(teacher(jnp.asarray(tok), jnp.asarray(seg))[0], np.float64)
    valid = np.zeros(tok.shape, bool)
    valid[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    logp, logq = log_softmax(zt / F.temperature), log_softmax(zs / F.temperature)
    kl_sum += float((np.exp(logp) * (logp - logq)).sum(-1)[valid].sum())
    n += int(valid.sum())
  ref = kl_sum / n
  print(json.dumps({"checkpoint": str(path), "temperature": F.temperature,
                    "kl_full": fused["kl_full"], "kl_float64": ref,
                    "rel_err": abs(fused["kl_full"] - ref) / ref, "tokens": n,
                    "fused_tokens": fused["tokens"]}))


if __name__ == "__main__":
  from moedistill.cli import run
  run(main, extra_flags=(define_flags,))
