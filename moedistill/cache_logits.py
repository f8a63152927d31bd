"""Cache the teacher's top-k logits and full-vocab logsumexp for the train and eval rows.

CLI: python -m moedistill.cache_logits --config=configs/two_stage.py [--overwrite]
     [--split=train|eval|both]
Resumable: chunks already marked done are skipped, so rerunning a killed command finishes
the cache. Multi-host: every process runs the same command (after jax.distributed
.initialize); each writes only the chunks it owns; process 0 writes metadata.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from moedistill import cache, hf, sharding
from moedistill.config import Job
from moedistill.data import build_rows, fingerprint, load_texts
from moedistill.errors import ConfigError, UserError
from moedistill.model.config import ModelConfig
from moedistill.vocab_scan import topk_lse


def teacher_hash(path) -> str:
  """config.json bytes plus the names and sizes of the weight files (hashing 60 GB of
  weights would cost more than the check is worth)."""
  h = hashlib.sha256(Path(path, "config.json").read_bytes())
  for f in sorted(Path(path).glob("*.safetensors")):
    h.update(f"{f.name}:{f.stat().st_size}".encode())
  return h.hexdigest()[:16]


def make_metadata(job: Job, spec, cfg: ModelConfig, rows=None) -> dict:
  """The cache's metadata; without `rows` (no tokenization) the row count is left out."""
  c = job.cache
  k, s = c.k, len(c.temperatures)
  if rows is None:
    fp, th = fingerprint(spec, load_texts(spec)[1])
  else:
    fp, th = rows.fingerprint, rows.tokenizer_hash
  meta = {
      "format": cache.FORMAT, "teacher": job.teacher, "teacher_hash": teacher_hash(job.teacher),
      "tokenizer_hash": th, "data_fingerprint": fp,
      "vocab_size": cfg.vocab_size, "k": k, "temperatures": list(c.temperatures),
      "seq_len": spec.seq_len, "rows": None if rows is None else int(rows.tokens.shape[0]),
      "rows_per_chunk": c.rows_per_chunk, "codec": c.codec,
      "dtypes": {"tokens": "int32", "segment_ids": "int32", "topk_idx": "int32",
                 "topk_logit": "bfloat16", "lse": "float32"},
      "bytes_per_token_raw": 8 + k * 6 + 4 * s, "complete": False,
  }
  if rows is None:
    del meta["rows"]
  return meta


def finished(job: Job, split: str) -> bool:
  """True when a complete cache made with exactly this config is there (no tokenization);
  a complete cache made differently is refused, naming the field."""
  path = job.cache_path(split)
  old = cache.read_metadata(path)
  if old is None or not old.get("complete"):
    return False
  spec = job.train_data if split == "train" else job.eval_data
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  new = make_metadata(job, spec, cfg)
  diff = cache.first_difference({k: v for k, v in old.items() if k != "rows"}, new)
  if diff is not None:
    raise UserError(f"cache.path={path} holds a cache made with different {diff} "
                    f"({old.get(diff)!r} vs {new.get(diff)!r}); run python -m "
                    "moedistill.cache_logits --overwrite to replace it")
  return True


def check_inputs(job: Job, rows, cfg: ModelConfig):
  if rows.vocab_size > cfg.vocab_size:
    raise ConfigError(f"data.tokenizer={job.train_data.tokenizer}: vocab of {rows.vocab_size} "
                      f"tokens exceeds the teacher's vocab_size={cfg.vocab_size}")
  if job.cache.k > cfg.vocab_size:
    raise ConfigError(f"config.cache.k={job.cache.k}: expected <= teacher vocab_size="
                      f"{cfg.vocab_size}")
  if len(rows.tokens) == 0:
    raise ConfigError("data: no rows after tokenization (empty dataset?)")


def make_forward(teacher, mesh, job: Job):
  graphdef, state = nnx.split(teacher)
  k, temps, chunk = job.cache.k, job.cache.temperatures, job.cache.vocab_chunk
  bs3 = sharding.batch_sharding(mesh, 3)

  def fwd(state, tokens_bt, segs_bt):
    model = nnx.merge(graphdef, state)
    h_btd, _ = model.hidden(tokens_bt, segs_bt)
    b, t, d = h_btd.shape
    v, i, lse = topk_lse(h_btd.reshape(b * t, d), model.lm_head_kernel(), k, temps, chunk)
    # Store logits minus the row max (and each lse of the shifted logits): the teacher's
    # distributions are shift-invariant, and the top logits, which carry the mass, keep
    # bf16 precision (raw logits of ~20 round by up to 0.06 in bf16: see README).
    top = v[:, :1]
    lse = lse - top / jnp.asarray(temps, jnp.float32)[None, :]
    return (v - top).reshape(b, t, k), i.reshape(b, t, k), lse.reshape(b, t, -1)

  jitted = jax.jit(fwd, out_shardings=(bs3, bs3, bs3))
  return lambda tokens, segs: jitted(state, tokens, segs)


def _prepare(path, meta, overwrite: bool) -> bool:
  """Process 0: create or check the store. Returns True when already complete."""
  old = cache.read_metadata(path)
  if old is not None and not overwrite:
    diff = cache.first_difference(old, meta)
    if diff is not None:
      raise UserError(f"cache.path={path} holds a cache made with different {diff} "
                      f"({old.get(diff)!r} vs {meta.get(diff)!r}); pass --overwrite to replace it")
    if old.get("complete"):
      return True
    cache.open_arrays(path, meta)
    return False
  if old is not None:
    cache.kvstore(path).delete_range(ts.KvStore.KeyRange()).result()
  try:
    cache.open_arrays(path, meta, create=True)
    cache.write_metadata(path, meta)
  except (ValueError, OSError) as e:
    raise UserError(f"cache.path={path}: cannot write ({str(e).splitlines()[0][:160]})") from None
  return False


def build_cache(job: Job, split: str, *, overwrite: bool = False, mesh=None,
                teacher=None, progress: bool = True, rows=None, checked: bool = False) -> str:
  """`rows` (a data.Rows) replaces the configured dataset, for benchmarks; `checked`: the
  caller already ran `finished()` (it hashes the data files, no need to do it twice)."""
  spec = job.train_data if split == "train" else job.eval_data
  path = job.cache_path(split)
  if rows is None:
    if not (overwrite or checked) and finished(job, split):
      return path
    rows = build_rows(spec)
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  check_inputs(job, rows, cfg)
  meta = make_metadata(job, spec, cfg, rows)
  p = jax.process_index()
  done_already = _prepare(path, meta, overwrite) if p == 0 else False
  done_already = bool(multihost_utils.broadcast_one_to_all(np.asarray(done_already)))
  if done_already:
    return path
  arrays = cache.open_arrays(path, meta)
  mesh = mesh or sharding.make_mesh(job.mesh)
  if teacher is None:
    teacher, _ = hf.load_model(job.teacher, dtype=job.model.dtype,
                               param_dtype=job.model.param_dtype,
                               moe_backend=job.model.moe_backend,
                               capacity_factor=job.model.capacity_factor,
                               attention=job.model.attention,
                               attention_block=job.model.attention_block,
                               put=sharding.sharded_put(mesh))
  fwd = make_forward(teacher, mesh, job)
  stats = _write_pending(job, rows, arrays, fwd, mesh, path, progress and p == 0)
  multihost_utils.sync_global_devices(f"cache {path} written")
  if p == 0:
    meta["complete"] = True
    meta["stats"] = stats
    cache.write_metadata(path, meta)
  multihost_utils.sync_global_devices(f"cache {path} complete")
  return path


def _chunk_rows(rows, c: int, R: int):
  n = len(rows.tokens)
  tok = np.zeros((R, rows.tokens.shape[1]), np.int32)
  seg = np.zeros_like(tok)
  if c >= 0:
    lo, hi = c * R, min(c * R + R, n)
    tok[: hi - lo], seg[: hi - lo] = rows.tokens[lo:hi], rows.segment_ids[lo:hi]
  return tok, seg


def _write_pending(job, rows, arrays, fwd, mesh, path, show):
  """Steps are fixed groups of chunks (step s = chunks s*G .. s*G+G-1, G = processes x
  chunks_per_step), so every chunk is always computed in the same batch position and a resumed
  run is bit-identical to an uninterrupted one. Steps whose chunks are all done are skipped."""
  R, per = job.cache.rows_per_chunk, job.cache.chunks_per_step
  p, P = jax.process_index(), jax.process_count()
  n = len(rows.tokens)
  done = arrays["done"].read().result()
  group = P * per
  if (group * R) % sharding.batch_divisor(mesh):
    raise ConfigError(f"config.cache.rows_per_chunk x chunks_per_step x processes = "
                      f"{group * R} rows per step, not divisible by the mesh's "
                      f"{sharding.batch_divisor(mesh)} batch shards")
  steps = [list(range(s, s + group)) for s in range(0, len(done), group)]
  steps = [st for st in steps if not all(done[c] for c in st if c < len(done))]
  rows_of = lambda c: min(R, n - c * R) if c < len(done) and not done[c] else 0  # noqa: E731
  bar = tqdm(total=sum(rows_of(c) for st in steps for c in st), unit="row",
             disable=not show, desc=f"caching {path}", mininterval=1.0)
  t0, tokens_done, inflight = time.time(), 0, []
  t_first, tokens_first = None, 0  # throughput excludes the first (compiling) step
  for step in steps:
    mine = step[p * per:(p + 1) * per]
    parts = [_chunk_rows(rows, c if c < len(done) else -1, R) for c in mine]
    tok = np.concatenate([a for a, _ in parts])
    seg = np.concatenate([b for _, b in parts])
    v, i, lse = fwd(sharding.global_batch(mesh, tok), sharding.global_batch(mesh, seg))
    _finish(arrays, inflight)  # previous step's writes overlapped this step's compute
    v, i, lse = (sharding.local_rows(x) for x in (v, i, lse))
    inflight = []
    for j, c in enumerate(mine):
      if not rows_of(c):
        continue
      m = rows_of(c)
      sl, rs = slice(c * R, c * R + m), slice(j * R, j * R + m)
      futs = [arrays["tokens"][sl].write(tok[rs]), arrays["segment_ids"][sl].write(seg[rs]),
              arrays["topk_idx"][sl].write(i[rs]),
              arrays["topk_logit"][sl].write(v[rs].astype(arrays["topk_logit"].dtype.numpy_dtype)),
              arrays["lse"][sl].write(lse[rs])]
      inflight.append((c, futs))
    step_rows = sum(rows_of(c) for c in step)
    tokens_done += step_rows * rows.tokens.shape[1]
    if t_first is None:
      t_first, tokens_first = time.time(), tokens_done
    bar.update(step_rows)
    bar.set_postfix(tok_s=f"{tokens_done / max(time.time() - t0, 1e-9):,.0f}", refresh=False)
  _finish(arrays, inflight)
  bar.close()
  dt = time.time() - (t_first or t0)
  return {"tokens_per_s_after_first_step": round((tokens_done - tokens_first) / dt)
          if dt > 0 and tokens_done > tokens_first else None}


def _finish(arrays, inflight):
  """Mark chunks done only after all their arrays are durably written."""
  for c, futs in inflight:
    for f in futs:
      f.result()
    arrays["done"][c].write(np.uint8(1)).result()


def main(argv):
  from moedistill.cli import load_job
  job, flags = load_job(argv)
  splits = ("train", "eval") if flags.split == "both" else (flags.split,)
  for split in splits:
    path = build_cache(job, split, overwrite=flags.overwrite)
    meta = cache.read_metadata(path)
    print(f"cache {split}: {path} ({meta['rows']} rows x {meta['seq_len']} tokens, k={meta['k']})")


if __name__ == "__main__":
  from moedistill.cli import run
  run(main, extra_flags=("overwrite", "split"))
