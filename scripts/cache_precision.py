"""How much precision bf16 top-k logits lose: raw vs shifted by the row max.

Usage: python scripts/cache_precision.py [--teacher moedistill/assets/tiny_teacher]
       [--cache runs/two_stage/cache/eval] [--k 32]
Runs the teacher on the cache's rows and prints, for raw and max-shifted logits rounded to
bf16, the mean bucket-mode KL of the stored distribution to the exact one (float32).
"""
import argparse

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moedistill.data.cache import CacheReader
from moedistill.hub import hf
from moedistill.training import loss
from moedistill.training.train_step import labels_and_mask


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--teacher", default="moedistill/assets/tiny_teacher")
  ap.add_argument("--cache", default="runs/two_stage/cache/eval")
  ap.add_argument("--k", type=int, default=32)
  a = ap.parse_args()
  model, cfg = hf.load_model(a.teacher)
  r = CacheReader(a.cache)
  rows = r.read_rows(np.arange(r.rows))
  logits, _ = model(jnp.asarray(rows["tokens"]), jnp.asarray(rows["segment_ids"]))
  z = np.asarray(logits, np.float64).reshape(-1, cfg.vocab_size)
  mask = np.asarray(labels_and_mask(rows["tokens"], rows["segment_ids"])[1]).reshape(-1)
  idx = np.argsort(-z, -1)[:, :a.k]
  exact = loss.dense_stats(jnp.asarray(z, jnp.float32), jnp.asarray(idx),
                           jnp.zeros(len(z), jnp.int32), 1.0)
  for name, shift in (("raw", 0.0), ("shifted", 1.0)):
    zz = z - shift * z.max(-1, keepdims=True)
    top = np.take_along_axis(zz, idx, -1).astype(ml_dtypes.bfloat16).astype(np.float32)
    lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
    kl, _, _ = loss.kl_terms(jnp.asarray(top), jnp.asarray(lse, jnp.float32), exact["s_topk"],
                             exact["lse_t"], 1.0, "bucket")
    print(f"{name:8s} KL {float(np.sum(np.asarray(kl) * mask) / mask.sum()):.6f} nats "
          f"(max |logit| {np.abs(z).max():.1f})")


if __name__ == "__main__":
  main()
