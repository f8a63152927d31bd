"""The logits phase's step loop: reads each step's token chunks ahead, runs the teacher's
forward, writes each process's chunks (plain, packed or sampled) while the next step computes,
and marks a chunk done only after all its arrays are written, so a killed run resumes at the
first chunk not marked."""
from __future__ import annotations

import time

import jax
import numpy as np
from tqdm import tqdm

from moedistill import sharding
from moedistill.config import Job
from moedistill.data import cache
from moedistill.errors import ConfigError


def uniforms(job: Job, chunks, R: int, L: int):
  """The sampled cache's uniforms for this process's `chunks` of a step, [len x R, L, N]:
  chunk c's from a generator seeded (job.seed, c) alone, so a rebuild or a resumed run
  draws the same ids for it whatever the step or process computes it."""
  n = job.cache.samples
  return np.concatenate([np.random.default_rng([job.seed, max(int(c), 0)]).random((R, L, n))
                         for c in chunks]).astype(np.float32)


def _read_step(arrays, chunks, R: int, n: int):
  """Async reads of the token rows of `chunks` (-1 or past the end: padding)."""
  out = []
  for c in chunks:
    sl = slice(c * R, min(c * R + R, n)) if 0 <= c * R < n else None
    out.append(None if sl is None else (arrays["tokens"][sl].read(),
                                         arrays["segment_ids"][sl].read()))
  return out


def _gather(reads, R: int, L: int):
  tok = np.zeros((len(reads) * R, L), np.int32)
  seg = np.zeros_like(tok)
  for j, r in enumerate(reads):
    if r is not None:
      t = r[0].result()
      tok[j * R: j * R + len(t)], seg[j * R: j * R + len(t)] = t, r[1].result()
  return tok, seg


def _pending_steps(job, done, mesh):
  """Steps are fixed groups of chunks (step s = chunks s*G .. s*G+G-1, G = processes x
  chunks_per_step), so every chunk is always computed in the same batch position and a resumed
  run is bit-identical to an uninterrupted one. Steps whose chunks are all done are skipped."""
  R, group = job.cache.rows_per_chunk, jax.process_count() * job.cache.chunks_per_step
  if (group * R) % sharding.batch_divisor(mesh):
    raise ConfigError(f"config.cache.rows_per_chunk x chunks_per_step x processes = "
                      f"{group * R} rows per step, not divisible by the mesh's "
                      f"{sharding.batch_divisor(mesh)} batch shards")
  steps = [list(range(s, s + group)) for s in range(0, len(done), group)]
  return [st for st in steps if not all(done[c] for c in st if c < len(done))]


def write_pending(job, meta, arrays, fwd, mesh, path, show):
  """Runs the teacher over every pending step, reading the next step's token chunks while
  this one computes and writing this step's chunks while the next one computes; returns
  throughput stats. A step is `chunks_per_step` row chunks per process."""
  rows_per_chunk, rows, seq_len = job.cache.rows_per_chunk, meta["rows"], meta["seq_len"]
  per_proc, proc = job.cache.chunks_per_step, jax.process_index()
  done = arrays["done"].read().result()
  steps = _pending_steps(job, done, mesh)

  def chunk_rows(chunk):
    """Rows of a chunk still to compute (0 when done or past the end)."""
    pending = chunk < len(done) and not done[chunk]
    return min(rows_per_chunk, rows - chunk * rows_per_chunk) if pending else 0

  def my_chunks(step):
    return step[proc * per_proc:(proc + 1) * per_proc]

  total = sum(chunk_rows(chunk) for step in steps for chunk in step)
  # The bar is made after the first step, which compiles: its rate and ETA then count
  # compiled steps only.
  bar = tqdm(disable=True)
  t0, tokens_done, inflight = time.time(), 0, []
  t_first, tokens_first = None, 0  # throughput excludes the first (compiling) step
  next_read = _read_step(arrays, my_chunks(steps[0]), rows_per_chunk, rows) if steps else None
  for n, step in enumerate(steps):
    mine = my_chunks(step)
    tok, seg = _gather(next_read, rows_per_chunk, seq_len)
    if n + 1 < len(steps):
      next_read = _read_step(arrays, my_chunks(steps[n + 1]), rows_per_chunk, rows)
    draws = ([sharding.global_batch(mesh, uniforms(job, mine, rows_per_chunk, seq_len))]
             if job.cache.mode == "sampled" else [])
    out = fwd(sharding.global_batch(mesh, tok), sharding.global_batch(mesh, seg), *draws)
    _finish(arrays, inflight)  # previous step's writes overlapped this step's compute
    out = [sharding.local_rows(x) for x in out]
    inflight = [(chunk, _write_chunk(arrays, chunk, slot, rows_per_chunk, chunk_rows(chunk),
                                     *out, meta=meta))
                for slot, chunk in enumerate(mine) if chunk_rows(chunk)]
    step_rows = sum(chunk_rows(chunk) for chunk in step)
    tokens_done += step_rows * seq_len
    if t_first is None:
      t_first, tokens_first = time.time(), tokens_done
      bar = tqdm(total=total, initial=step_rows, unit="row", disable=not show,
                 desc=f"caching {path}", mininterval=1.0)
    else:
      bar.update(step_rows)
    bar.set_postfix(tok_s=f"{tokens_done / max(time.time() - t0, 1e-9):,.0f}", refresh=False)
  _finish(arrays, inflight)
  bar.close()
  dt = time.time() - (t_first or t0)
  return {"tokens_per_s_after_first_step": round((tokens_done - tokens_first) / dt)
          if dt > 0 and tokens_done > tokens_first else None}


def _write_chunk(arrays, chunk, slot, rows_per_chunk, n_rows, logits, ids, lse, sampled=None,
                 meta=None):
  """Writes row chunk `chunk` from slot `slot` of this process's step outputs (its first
  `n_rows` rows); returns the write futures."""
  dest = slice(chunk * rows_per_chunk, chunk * rows_per_chunk + n_rows)
  src = slice(slot * rows_per_chunk, slot * rows_per_chunk + n_rows)
  if meta is not None and meta["format"] != cache.FORMAT:
    return _write_coded_chunk(arrays, chunk, dest, meta, logits[src], ids[src], lse[src],
                              None if sampled is None else sampled[src])
  return [arrays["topk_idx"][dest].write(ids[src]),
          arrays["topk_logit"][dest].write(
              logits[src].astype(arrays["topk_logit"].dtype.numpy_dtype)),
          arrays["lse"][dest].write(lse[src])]


def _write_coded_chunk(arrays, c, sl, meta, v, i, lse, ids):
  """A packed or sampled chunk (data/topk_codec.py), encoded on the host."""
  from moedistill.data import topk_codec
  m, L = v.shape[:2]
  P = m * L
  if meta["format"] == cache.PACKED_FORMAT:
    stream, a = topk_codec.encode_topk(i.reshape(P, -1), v.reshape(P, -1), lse.reshape(P, -1),
                                       meta["temperatures"])
    a = {"rice_b": a["rice_b"].reshape(m, L), "topk_code": a["topk_code"].reshape(m, L, -1),
         "topk_top": a["topk_top"].reshape(m, L), "lse": a["lse"].reshape(m, L, -1)}
  elif meta["format"] == cache.SAMPLED_FORMAT:
    stream, a = topk_codec.encode_sampled(ids.reshape(P, -1))
    a = {"rice_b": a["rice_b"].reshape(m, L), "sample_count": a["sample_count"].reshape(m, L, -1)}
    if meta["exact_k"]:
      e = meta["exact_k"]
      a.update(topk_idx=i[..., :e], topk_logit=v[..., :e].astype(
          arrays["topk_logit"].dtype.numpy_dtype), lse=lse[..., :1])
  else:  # an older format is read, never extended (its metadata differs, so it is rebuilt)
    raise ValueError(f"cannot write chunks of a {meta['format']} cache")
  futs = [arrays[n][sl].write(x) for n, x in a.items()]
  return futs + [arrays["packed_ids"][c].write(
      topk_codec.put_stream(stream, meta["id_stream_bytes"]))]


def _finish(arrays, inflight):
  """Mark chunks done only after all their arrays are durably written."""
  for c, futs in inflight:
    for f in futs:
      f.result()
    arrays["done"][c].write(np.uint8(1)).result()
