"""Cache the teacher's top-k logits and full-vocab logsumexp for the train and eval rows.

CLI: python -m moedistill.cache_logits --config=configs/two_stage.py [--overwrite]
     [--split=train|eval|both] [--phase=tokens|logits|all] [--verify | --repair]
Two phases: `tokens` (moedistill.data.tokens: stream, tokenize, pack, split between processes) and
`logits` (the teacher over the token chunks). Resumable: finished pieces and chunks are
skipped, so rerunning a killed command finishes the cache. A later start compares the data
files' size and mtime and re-hashes only the changed ones (`--verify`: all of them, and
every chunk of the cache is read against its crc32c: damaged rows are printed and the command
exits 2; `--repair`: the same check, then only the damaged chunks are recomputed,
bit-identical to an undamaged cache; see data/cache_check.py).
Multi-host: every process runs the same command (after jax.distributed
.initialize); each writes only the chunks it owns; process 0 writes metadata.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx
from jax.experimental import multihost_utils

from moedistill import sharding
from moedistill.config import Job
from moedistill.data import cache, logits_writer, tokens
from moedistill.data.sources import load_tokenizer
from moedistill.errors import ConfigError, UserError, reason
from moedistill.hub import hf
from moedistill.model import resolve
from moedistill.model.config import ModelConfig
from moedistill.training.vocab_sample import sample_ids
from moedistill.training.vocab_scan import topk_lse


HASH_EDGE = 2**20  # bytes hashed at each end of a weight file


def teacher_hash(path) -> str:
  """config.json bytes plus, per weight file, its name, size, safetensors header (every
  tensor's name, dtype, shape and offsets) and the bytes of its first and last MiB. Reads
  ~2 MiB a file: a full hash of 60 GB of weights would cost minutes at every start, while a
  retrained or re-quantized teacher changes the values at the ends of every file (and most
  often its header), and a file of other tensors changes the header."""
  h = hashlib.sha256(Path(path, "config.json").read_bytes())
  for f in sorted(Path(path).glob("*.safetensors")):
    size = f.stat().st_size
    h.update(f"{f.name}:{size}".encode())
    with open(f, "rb") as fh:
      head = fh.read(8)
      n = int.from_bytes(head, "little") if len(head) == 8 else 0
      h.update(head + fh.read(min(n, size)))  # the header
      fh.seek(0)
      h.update(fh.read(HASH_EDGE))
      fh.seek(max(0, size - HASH_EDGE))
      h.update(fh.read(HASH_EDGE))
  return h.hexdigest()[:16]


def make_metadata(job: Job, spec, cfg: ModelConfig, tokens_meta: dict) -> dict:
  """The cache's metadata: the logits phase's settings plus what the tokens phase made."""
  c = job.cache
  k, s = c.k, len(c.temperatures)
  return _kind_metadata(job, cfg.vocab_size, {
      "format": cache.FORMAT, "teacher": job.teacher, "teacher_hash": teacher_hash(job.teacher),
      "tokenizer_hash": tokens_meta["tokenizer_hash"],
      "data_fingerprint": tokens_meta["data_fingerprint"],
      "vocab_size": cfg.vocab_size, "k": k, "temperatures": list(c.temperatures),
      "seq_len": spec.seq_len, "rows": tokens_meta["rows"],
      "rows_per_chunk": c.rows_per_chunk, "codec": c.codec,
      "dtypes": {"tokens": "int32", "segment_ids": "int32", "topk_idx": "int32",
                 "topk_logit": "bfloat16", "lse": "float32"},
      "bytes_per_token_raw": 8 + k * 6 + 4 * s, "complete": False,
  })


def _kind_metadata(job: Job, vocab: int, meta: dict) -> dict:
  """A packed or sampled cache's fields (data/topk_codec.py); a plain cache's metadata is
  exactly what it was before formats existed, so old caches stay `finished`."""
  c = job.cache
  if c.format == "plain" and c.mode == "topk":
    return meta
  from moedistill.data import topk_codec
  positions = c.rows_per_chunk * meta["seq_len"]
  if c.mode == "sampled":
    e, n = c.exact_k, c.samples
    cap = topk_codec.stream_cap(positions, n, vocab)
    meta.update(format=cache.SAMPLED_FORMAT, k=e + n, samples=n, exact_k=e, sample_seed=job.seed,
                id_stream_bytes=cap, dtypes={"tokens": "int32", "segment_ids": "int32",
                                             "rice_b": "uint8", "sample_count": "uint8",
                                             "packed_ids": "uint8", **({"topk_idx": "int32",
                                             "topk_logit": "bfloat16", "lse": "float32"}
                                                                      if e else {})},
                bytes_per_token_raw=8 + 1 + n + (6 * e + 4 if e else 0) + cap / positions)
  else:
    cap = topk_codec.stream_cap(positions, c.k, vocab)
    meta.update(format=cache.PACKED_FORMAT, value_step=topk_codec.STEP, id_stream_bytes=cap,
                dtypes={"tokens": "int32", "segment_ids": "int32", "rice_b": "uint8",
                        "packed_ids": "uint8", "topk_code": "uint8", "topk_top": "uint8",
                        "lse": "float32"},
                bytes_per_token_raw=8 + 2 + c.k + 4 * len(c.temperatures) + cap / positions)
  meta["bytes_per_token_raw"] = round(meta["bytes_per_token_raw"], 2)
  return meta


def finished(job: Job, split: str, verify: bool = False) -> bool:
  """True when a complete cache made with exactly this config is there. Cheap: data files are
  re-hashed only when their size or mtime changed (all of them with `verify`). A complete
  cache made differently is refused, naming the field."""
  path = job.cache_path(split)
  old = cache.read_metadata(path)
  if old is None or not old.get("complete"):
    return False
  spec = job.train_data if split == "train" else job.eval_data
  tokens_meta = tokens.finished(spec, path, job.cache.rows_per_chunk, job.cache.codec, verify)
  if tokens_meta is None:
    return False
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  new = make_metadata(job, spec, cfg, tokens_meta)
  diff = cache.first_difference(old, new)
  if diff is not None:
    raise UserError(f"cache.path={path} holds a cache made with different {diff} "
                    f"({old.get(diff)!r} vs {new.get(diff)!r}); run python -m "
                    "moedistill.cache_logits --overwrite to replace it")
  return True


def check_inputs(job: Job, tokenizer_vocab: int, cfg: ModelConfig):
  if tokenizer_vocab > cfg.vocab_size:
    raise ConfigError(f"data.tokenizer={job.train_data.tokenizer}: vocab of {tokenizer_vocab} "
                      f"tokens exceeds the teacher's vocab_size={cfg.vocab_size}")
  if job.cache.k > cfg.vocab_size:
    raise ConfigError(f"config.cache.k={job.cache.k}: expected <= teacher vocab_size="
                      f"{cfg.vocab_size}")


def check_exact(rt, mesh):
  """A teacher cache is reused by every later run without a sign of how it was made: refuse
  (one line) a Runtime that may drop token copies, rather than cache inexact logits."""
  why = resolve.drops(rt, dict(mesh.shape).get("expert", 1))
  if why is not None:
    raise ConfigError(f"teacher cache: {why}")


def make_forward(teacher, mesh, job: Job):
  check_exact(teacher.runtime, mesh)
  graphdef, state = nnx.split(teacher)
  jitted = forward_program(graphdef, mesh, job)
  return lambda tokens, segs, *u: jitted(state, tokens, segs, *u)


def forward_program(graphdef, mesh, job: Job):
  """The jitted teacher forward (state, tokens, segment ids) -> (top-k logits, ids, lse);
  also what `moedistill.plan` compiles with abstract inputs."""
  check_exact(job.model, mesh)  # `auto` never resolves to a dropping backend
  k, temps, chunk = job.cache.k, job.cache.temperatures, job.cache.vocab_chunk
  bs3 = sharding.batch_sharding(mesh, 3)
  sampled, e = job.cache.mode == "sampled", job.cache.exact_k
  if sampled:  # sampled: the exact top ids (at least one: the argmax), then N draws
    k = max(e, 1)

  def fwd(state, tokens_bt, segs_bt, *u_btn):
    model = nnx.merge(graphdef, state)
    h_btd, _ = model.hidden(tokens_bt, segs_bt)
    b, t, d = h_btd.shape
    v, i, lse = topk_lse(h_btd.reshape(b * t, d), model.lm_head_kernel(), k, temps, chunk)
    if sampled:  # u: uniforms of each row chunk (_uniforms); drawn before the shift below
      ids = sample_ids(h_btd.reshape(b * t, d), model.lm_head_kernel(),
                       u_btn[0].reshape(b * t, -1), lse[:, 0], temps[0], chunk,
                       i[:, :e] if e else None, v[:, :e] if e else None).reshape(b, t, -1)
    # Store logits minus the row max (and each lse of the shifted logits): the teacher's
    # distributions are shift-invariant, and the top logits, which carry the mass, keep
    # bf16 precision (raw logits of ~20 round by up to 0.06 in bf16: see README).
    top = v[:, :1]
    lse = lse - top / jnp.asarray(temps, jnp.float32)[None, :]
    out = (v - top).reshape(b, t, k), i.reshape(b, t, k), lse.reshape(b, t, -1)
    return (*out, ids) if sampled else out

  return jax.jit(sharding.on_mesh(mesh, fwd), out_shardings=(bs3,) * (4 if sampled else 3))


def _prepare(path, meta, overwrite: bool) -> bool:
  """Process 0: create or check the logit arrays (the tokens stay). True when complete."""
  old = cache.read_metadata(path)
  if old is not None and not overwrite:
    diff = cache.first_difference(old, meta)
    if diff is not None:
      raise UserError(f"cache.path={path} holds a cache made with different {diff} "
                      f"({old.get(diff)!r} vs {meta.get(diff)!r}); pass --overwrite to replace it")
    if old.get("complete"):
      return True
    cache.open_arrays(path, meta, names=cache.logit_arrays(meta))
    return False
  try:
    kv = cache.kvstore(path)
    if old is not None:
      kv.delete_range(ts.KvStore.KeyRange("metadata.json", "metadata.json\0")).result()
      for name in cache.ALL_LOGIT_ARRAYS:
        kv.delete_range(ts.KvStore.KeyRange(name + "/", name + "0")).result()
    cache.open_arrays(path, meta, create=True, names=cache.logit_arrays(meta))
    cache.write_metadata(path, meta)
  except (ValueError, OSError) as e:
    raise UserError(f"cache.path={path}: cannot write ({reason(e)})") from None
  return False


def _tokens_phase(job: Job, split: str, phase: str, overwrite: bool, verify: bool,
                  progress: bool) -> dict:
  """Checks the inputs, then runs (or, for phase=logits, requires) the tokens phase."""
  spec, path, c = (job.train_data if split == "train" else job.eval_data,
                   job.cache_path(split), job.cache)
  tok = load_tokenizer(spec.tokenizer)
  check_inputs(job, len(tok), ModelConfig.from_json_file(Path(job.teacher, "config.json")))
  if phase == "logits":
    got = tokens.finished(spec, path, c.rows_per_chunk, c.codec, verify)
    if got is None:
      raise UserError(f"cache {path}: the tokens phase is not complete; run python -m "
                      "moedistill.cache_logits --phase=tokens (or all) first")
    return got
  return tokens.build(spec, path, tok, rows_per_chunk=c.rows_per_chunk, codec=c.codec,
                      overwrite=overwrite, verify=verify,
                      progress=progress and jax.process_index() == 0)


def build_cache(job: Job, split: str, *, overwrite: bool = False, mesh=None, teacher=None,
                progress: bool = True, checked: bool = False, phase: str = "all",
                verify: bool = False, tokens_meta: dict | None = None) -> str:
  """Builds the split's cache: phase `tokens`, `logits` or `all`. `checked`: the caller
  already ran `finished()`; `tokens_meta`: a token store written by `tokens.write_rows`
  (benchmarks) stands in for the tokens phase."""
  spec = job.train_data if split == "train" else job.eval_data
  path = job.cache_path(split)
  if tokens_meta is None:
    if phase != "tokens" and not (overwrite or checked) and finished(job, split, verify):
      return path  # made already (by an exact backend): reusable whatever this run computes with
    if phase != "tokens":  # before any work: refuse a dropping backend (make_forward checks too)
      check_exact(job.model if teacher is None else teacher.runtime,
                  mesh or sharding.make_mesh(job.mesh))
    tokens_meta = _tokens_phase(job, split, phase, overwrite, verify, progress)
  if phase == "tokens":
    return path
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  meta = make_metadata(job, spec, cfg, tokens_meta)
  p = jax.process_index()
  done_already = _prepare(path, meta, overwrite) if p == 0 else False
  done_already = bool(multihost_utils.broadcast_one_to_all(np.asarray(done_already)))
  if done_already:
    return path
  arrays = cache.open_arrays(path, meta)
  mesh = mesh or sharding.make_mesh(job.mesh)
  if teacher is None:
    teacher, _ = hf.load_model(job.teacher, job.model, put=sharding.sharded_put(mesh))
  fwd = make_forward(teacher, mesh, job)
  meta["teacher_runtime"] = resolve.record(teacher.runtime)  # dropless: make_forward checked
  stats = logits_writer.write_pending(job, meta, arrays, fwd, mesh, path, progress and p == 0)
  multihost_utils.sync_global_devices(f"cache {path} written")
  if p == 0:
    meta["complete"] = True
    meta["stats"] = {**stats, "bytes_per_token_disk": cache.bytes_per_token_on_disk(path, meta)}
    cache.write_metadata(path, meta)
  multihost_utils.sync_global_devices(f"cache {path} complete")
  return path


def check_chunks(job: Job, split: str) -> tuple[str, dict, dict]:
  """(path, metadata, {array: damaged row chunks}) of the split's cache: every chunk of
  every array read against its crc32c (data/cache_check.py); the damaged rows printed."""
  from moedistill.data import cache_check
  path = job.cache_path(split)
  meta = cache.read_metadata(path)
  if meta is None:
    raise UserError(f"cache {path}: no metadata.json, nothing to check; run python -m "
                    "moedistill.cache_logits to build it")
  bad = cache_check.damaged(path, meta)
  for line in cache_check.describe(path, meta, bad):
    print(line)
  return path, meta, bad


def repair(job: Job, split: str, progress: bool = True) -> list[int]:
  """Recomputes only the damaged chunks of the split's cache (bit-identical to an undamaged
  cache: same batch positions, deterministic tokens); returns the row chunks rewritten."""
  from moedistill.data import cache_check
  if jax.process_count() > 1:  # the check, the deletions and the copies are not split up
    raise UserError(f"--repair: run it in one process ({jax.process_count()} were started); "
                    "the repaired cache serves every process")
  path, meta, bad = check_chunks(job, split)
  if not bad:
    return []
  spec = job.train_data if split == "train" else job.eval_data
  fixed = cache_check.repair_tokens(path, meta, bad, spec, load_tokenizer(spec.tokenizer))
  fixed += cache_check.mark_for_recompute(path, meta, bad)
  build_cache(job, split, progress=progress)  # the logits phase: only the cleared chunks
  left = cache_check.damaged(path, cache.read_metadata(path))
  if left:
    raise UserError(f"cache {path}: still damaged after --repair: "
                    + "; ".join(cache_check.describe(path, meta, left)))
  return sorted(set(fixed))


def main(argv):
  from moedistill.cli import load_job
  job, flags = load_job(argv)
  splits = ("train", "eval") if flags.split == "both" else (flags.split,)
  if flags.repair:
    for split in splits:
      fixed = repair(job, split)
      print(f"cache {split}: {job.cache_path(split)}: "
            + (f"recomputed {len(fixed)} damaged row chunks" if fixed else "no damaged chunk"))
    return
  damaged = []
  for split in splits:
    path = build_cache(job, split, overwrite=flags.overwrite, phase=flags.phase,
                       verify=flags.verify)
    if flags.verify and flags.phase != "tokens":
      from moedistill.data.cache_check import rows_text
      _, meta, bad = check_chunks(job, split)
      damaged += [f"{split} {name} rows {rows_text(meta, cs)}" for name, cs in bad.items()]
    if flags.phase == "tokens":
      meta = cache.read_metadata(path, tokens.META)
      print(f"tokens {split}: {path} ({meta['rows']} rows x {meta['seq_len']} tokens; "
            f"{meta['stats']})")
      continue
    meta = cache.read_metadata(path)
    print(f"cache {split}: {path} ({meta['rows']} rows x {meta['seq_len']} tokens, k={meta['k']})")
  if damaged:
    raise UserError(f"damaged cache chunks ({'; '.join(damaged)}); rerun with --repair instead "
                    "of --verify to recompute only those")


def define_flags():
  from absl import flags
  flags.DEFINE_bool("repair", False, "check every chunk of the cache against its checksum and "
                    "recompute only the damaged ones (--verify checks and lists them)")


if __name__ == "__main__":
  from moedistill.cli import run
  run(main, extra_flags=("overwrite", "split", "phase", "verify", define_flags))
