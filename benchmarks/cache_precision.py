"""How much precision bf16 top-k logits lose: raw (the baseline) against shifted by the row max,
in the same run.

  python -m benchmarks.cache_precision [--teacher=moedistill/assets/tiny_teacher]
      [--cache=runs/two_stage/cache/eval] [--k=32]

Runs the teacher on the cache's rows and records, for raw and max-shifted logits rounded to
bf16, the mean bucket-mode KL of the stored distribution to the exact one (float32). The
default cache is the demo's held-out split (built by `python -m moedistill.train
--config=configs/two_stage.py`); `--smoke` builds a small one in a temporary directory.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import common

flags.DEFINE_string("teacher", "moedistill/assets/tiny_teacher", "teacher directory")
flags.DEFINE_string("cache", "runs/two_stage/cache/eval", "cache split whose rows to run")
flags.DEFINE_integer("k", 32, "top-k entries kept")
flags.DEFINE_bool("smoke", False, "an 8-row cache of 32 tokens from the embedded teacher, built "
                  "in a temporary directory (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def small_cache(root: Path) -> str:
  """The held-out split of the demo config, 8 rows of 32 tokens, under root."""
  from moedistill.cache_logits import build_cache
  from moedistill.config import job_from_config
  c = common.demo_config()
  c.workdir, c.teacher = str(root), F.teacher
  c.data.seq_len, c.data.eval.max_rows = 32, 8
  return build_cache(job_from_config(c), "eval", progress=False)


def measure(cache_path: str) -> dict:
  import jax.numpy as jnp
  import ml_dtypes
  import numpy as np
  from flax import nnx
  from moedistill.data.cache import CacheReader
  from moedistill.hub import hf
  from moedistill.training import loss
  from moedistill.training.train_step import labels_and_mask
  model, cfg = hf.load_model(F.teacher)
  r = CacheReader(cache_path)
  rows = r.read_rows(np.arange(r.rows))
  logits = nnx.jit(lambda m, t, s: m(t, s)[0])(model, jnp.asarray(rows["tokens"]),
                                               jnp.asarray(rows["segment_ids"]))
  z = np.asarray(logits, np.float64).reshape(-1, cfg.vocab_size)
  mask = np.asarray(labels_and_mask(rows["tokens"], rows["segment_ids"])[1]).reshape(-1)
  idx = np.argsort(-z, -1)[:, :F.k]
  exact = loss.dense_stats(jnp.asarray(z, jnp.float32), jnp.asarray(idx),
                           jnp.zeros(len(z), jnp.int32), 1.0)
  res = {"rows": int(r.rows), "k": F.k, "max_abs_logit": round(float(np.abs(z).max()), 2)}
  for name, shift in (("raw", 0.0), ("shifted", 1.0)):
    zz = z - shift * z.max(-1, keepdims=True)
    top = np.take_along_axis(zz, idx, -1).astype(ml_dtypes.bfloat16).astype(np.float32)
    lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
    kl, _, _ = loss.kl_terms(jnp.asarray(top), jnp.asarray(lse, jnp.float32), exact["s_topk"],
                             exact["lse_t"], 1.0, "bucket")
    res[f"{name}_kl_nats"] = float(np.sum(np.asarray(kl) * mask) / mask.sum())
    print(f"{name:8s} KL {res[f'{name}_kl_nats']:.6f} nats (max |logit| "
          f"{res['max_abs_logit']:.1f})", flush=True)
  return res


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    res = measure(small_cache(Path(tmp)) if F.smoke else F.cache)
  common.emit("cache_precision", res, F.out)


if __name__ == "__main__":
  app.run(main)
