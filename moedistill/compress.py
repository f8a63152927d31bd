"""Zero-shot compressed student ("checkpoint-0") from a teacher: core = mean of a layer's
experts (or routing-frequency weighted), wrappers = truncated SVD of each expert's delta.

CLI: python -m moedistill.compress --teacher=DIR --out=DIR --rank=R [--rank_down=R2]
     python -m moedistill.compress --config=configs/two_stage.py  (teacher, out, ranks from it)
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moedistill import sharding
from moedistill.cli import load_job, pick, run
from moedistill.errors import ConfigError
from moedistill.hub import hf
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import PROJS, Compression, merged_experts


def factor_experts(w_eio, rank: int, freq_e=None):
  """Returns (core [i, o], A [e, i, r], B [e, r, o]); sqrt(S) goes to both factors so they
  start at the same scale."""
  w = jnp.asarray(w_eio, jnp.float32)
  if freq_e is None:
    core = jnp.mean(w, axis=0)
  else:
    p = jnp.asarray(freq_e, jnp.float32)
    core = jnp.einsum("e,eio->io", p / jnp.sum(p), w)
  u, s, vt = jnp.linalg.svd(w - core[None], full_matrices=False)
  root = jnp.sqrt(s[:, :rank])
  return core, u[:, :, :rank] * root[:, None, :], root[:, :, None] * vt[:, :rank, :]


def routing_frequency(teacher, reader, max_rows: int = 256, batch: int = 8, mesh=None):
  """Per MoE layer, how often each expert is among a token's top-k on cached rows. With
  `mesh` (the teacher's params on it) batches are sharded over it: every process calls this
  and reads only its share of the rows."""
  from moedistill.training.held_out import read_batch, eval_batch_size
  cfg = teacher.config
  graphdef, state = nnx.split(teacher)

  def counts(state, batch):
    _, aux = nnx.merge(graphdef, state).hidden(batch["tokens"], batch["segment_ids"])
    valid = (batch["segment_ids"] > 0).reshape(-1, 1).astype(jnp.float32)
    out = []
    for logits in aux["router_logits"]:
      _, sel = jax.lax.top_k(logits.reshape(-1, cfg.num_experts), cfg.num_experts_per_tok)
      out.append(jnp.sum(jax.nn.one_hot(sel, cfg.num_experts).sum(1) * valid, 0))
    return out

  counts = (jax.jit(counts) if mesh is None else jax.jit(
      sharding.on_mesh(mesh, counts), out_shardings=sharding.replicated(mesh)))
  n = min(reader.rows, max_rows)
  batch = eval_batch_size(mesh, batch)
  total = [np.zeros(cfg.num_experts) for _ in cfg.moe_layers]
  for lo in range(0, n, batch):
    for acc, c in zip(total, counts(state, read_batch(reader, lo, n, batch, mesh))):
      acc += np.asarray(c)
  return dict(zip(cfg.moe_layers, total))


def param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def factor_program(mesh, rank: int, out_shardings):
  """The jitted per-layer compression of one projection's stacked experts w [e, i, o] (and an
  optional routing frequency [e]): returns (core, A, B, relative reconstruction error).
  The experts are spread over every device for the SVDs (each device factors e/n of them);
  core, A and B leave in the student's param shardings."""
  n = mesh.devices.size
  rep = sharding.replicated(mesh)

  def fn(w_eio, freq_e):
    w = w_eio.astype(jnp.float32)
    if w.shape[0] % n == 0:
      w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P(mesh.axis_names)))
    core, a, b = factor_experts(w, rank, freq_e)
    err = jnp.linalg.norm(merged_experts(core, a, b) - w) / jnp.linalg.norm(w)
    return core, a, b, err

  return jax.jit(fn, out_shardings=(*out_shardings, rep))


def compress_model(teacher, comp: Compression, freq_le: dict[int, np.ndarray] | None = None,
                   mesh=None):
  """Returns (student, report): report rows are per MoE layer, relative Frobenius error per
  projection of the reconstructed experts. Runs on `mesh` (default: one device): every
  process of a multi-host run takes part, and the student comes out sharded like train's."""
  cfg = teacher.config
  comp.check(cfg)
  mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
  student = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(
      cfg, rngs=nnx.Rngs(0), runtime=teacher.runtime, compression=comp))
  graphdef, state = nnx.split(student)
  flat = dict(nnx.to_flat_state(state))
  src = hf.state_arrays(teacher)
  dtype = teacher.runtime.param_dtype
  where = {p: sharding.param_sharding(mesh, v.shape, v.get_metadata().get("logical_axes"))
           for p, v in flat.items()}
  for p, var in flat.items():
    if p in src:
      var.set_value(jax.device_put(src[p].astype(dtype), where[p]))
  report, programs = [], {}
  for i in cfg.moe_layers:
    base = ("layers", i, "mlp", "experts")
    row = {"layer": i}
    for q in PROJS:
      names = (("shared_core", q), ("wrapper", f"{q}_a"), ("wrapper", f"{q}_b"))
      if q not in programs:  # one program per projection: every layer has the same shapes
        programs[q] = factor_program(mesh, comp.rank(q), [where[base + nm] for nm in names])
      *parts, err = programs[q](src[base + (f"{q}_proj",)], None if freq_le is None else freq_le[i])
      for nm, val in zip(names, parts):
        flat[base + nm].set_value(val.astype(dtype))
      row[q] = float(sharding.to_host(err))
    report.append(row)
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), report


def report_json(comp: Compression, report, teacher_dir) -> str:
  """compression_report.json: what made the student (its compression and the teacher's
  hash, which `train` compares before reusing it) and the per-layer errors."""
  from moedistill.cache_logits import teacher_hash
  return json.dumps({"compression": dataclasses.asdict(comp),
                     "teacher_hash": teacher_hash(teacher_dir), "layers": report}, indent=2)


def print_report(report, teacher_params: int, student_params: int, file=sys.stdout):
  print(f"{'layer':>5} {'gate err':>9} {'up err':>9} {'down err':>9}", file=file)
  for r in report:
    print(f"{r['layer']:>5} {r['gate']:>9.4f} {r['up']:>9.4f} {r['down']:>9.4f}", file=file)
  print(f"params: teacher {teacher_params:,}  student {student_params:,}  "
        f"compression {teacher_params / student_params:.2f}x", file=file)


def define_flags():
  from absl import flags
  flags.DEFINE_string("teacher", None, "HF Qwen3-MoE checkpoint directory "
                      "(default: config.teacher)")
  flags.DEFINE_string("out", None, "output directory, a native compressed checkpoint "
                      "(default: config.student.init_from, where train looks for it)")
  flags.DEFINE_integer("rank", None, "wrapper rank for gate/up/down (default: the config's)")
  for q in PROJS:
    flags.DEFINE_integer(f"rank_{q}", None, f"the {q} rank (default: --rank)")
  flags.DEFINE_enum("core", "mean", ["mean", "routing_weighted"],
                    "core = plain mean of the experts, or weighted by routing frequency")
  flags.DEFINE_string("cache", None, "routing_weighted: a teacher cache whose rows measure "
                      "the routing frequency (default: the config's train cache)")
  flags.DEFINE_integer("max_rows", 256, "rows used to measure routing")


def _ranks(F, job) -> list[int]:
  """--rank_<q>, else --rank, else the config's ranks."""
  out = []
  for i, q in enumerate(PROJS):
    own = getattr(F, f"rank_{q}")
    out.append(pick(own if own is not None else F.rank, "rank", job and job.ranks[i]))
  return out


def main(argv):
  job, F = load_job(argv, required=False)
  teacher_dir = pick(F.teacher, "teacher", job and job.teacher)
  out = Path(pick(F.out, "out", job and job.student_init))
  if out.exists() and not F.overwrite:
    raise ConfigError(f"--out={out} already exists; pass --overwrite to replace it")
  comp = Compression(*_ranks(F, job), core=F.core)
  cache = None
  if F.core == "routing_weighted":
    cache = pick(F.cache, "cache", job and job.cache_path("train"))
  # Every process takes part: the teacher is read into its shardings and compressed there.
  mesh = sharding.make_mesh(job.mesh if job else sharding.MeshConfig())
  rt = Runtime(param_dtype=job.model.param_dtype) if job else Runtime()
  teacher, _ = hf.load_model(teacher_dir, rt, put=sharding.sharded_put(mesh))
  freq = None
  if cache is not None:
    from moedistill.data.cache import CacheReader
    freq = routing_frequency(teacher, CacheReader(cache), F.max_rows, mesh=mesh)
  student, report = compress_model(teacher, comp, freq, mesh=mesh)
  first = jax.process_index() == 0
  if first:
    print_report(report, param_count(teacher), param_count(student))
  hf.save_model(student, out, tokenizer_from=teacher_dir, extra_files={  # process 0 writes
      "compression_report.json": report_json(comp, report, teacher_dir)})
  if first:
    print(f"wrote {out}")


if __name__ == "__main__":
  run(main, extra_flags=("overwrite", define_flags))
