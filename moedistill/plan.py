"""Will a config fit its devices? Lowers and compiles, with abstract inputs (no weights: the
teacher directory needs only its config.json), the jitted programs `train` runs: the teacher
cache forward, compress (per projection), each stage's train step, eval and export. Per
program: bytes per device (compiled memory analysis: arguments + outputs - donated aliases +
temporaries, plus what stays resident beside the program), FLOPs per device (cost analysis),
collective bytes per device (operands of all-gather, all-reduce, reduce-scatter, all-to-all,
collective-permute in the compiled HLO; and, per kind, the bytes each device receives) and
compile seconds. XLA counts a loop body once: with
micro_batches > 1 the train step's FLOPs and collective bytes are those of one micro-batch
plus the update.

CLI: python -m moedistill.plan --config=configs/two_stage.py [--devices=N] [--device_memory=80GiB]
--devices=N compiles for N forced CPU devices (set before jax is imported). The last stdout
line is one JSON object: {"fits", "device_memory", "programs": {name: {"bytes_per_device",
"flops_per_device", "collective_bytes_per_device", "compile_s", ...}}}. A program that does
not fit: exit status 2 and one line naming it, the overshoot and the knobs that would help.
--platform=cuda|rocm|tpu|cpu [--device_kind="NVIDIA H100 80GB HBM3"] lowers the same programs
for that platform without compiling them (no device of it needed; config checks and `auto`
resolve for it, see model/resolve.py) and reports per program whether it lowered and the custom
calls in it (a Pallas Triton kernel: `__gpu$xla.gpu.triton`), or its error's first line (then
exit status 2). Its last stdout line is one JSON object: {"platform", "device_kind", "runtime"
(what teacher and student resolve to), "lowered", "programs": {name: {...}}}.
"""
from __future__ import annotations

import os
import sys


def _force_cpu_devices(argv):
  """--devices=N must reach XLA before jax is imported. XLA:CPU's default scheduler optimises
  for concurrency and keeps independent ops' buffers live together (measured on the
  qwen3_30b_a3b teacher forward: temporaries grow ~4 GiB per layer with it, stay flat without);
  accelerators schedule for memory, so the simulation asks for the memory-minimising one."""
  for a in argv:
    if a.startswith("--devices=") and a.split("=", 1)[1].isdigit():
      flags = (f"--xla_force_host_platform_device_count={a.split('=', 1)[1]} "
               "--xla_cpu_enable_concurrency_optimized_scheduler=false")
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
      os.environ["JAX_PLATFORMS"] = "cpu"
      import moedistill
      moedistill.enough_cpu_threads_for_forced_devices()


if __name__ == "__main__":
  _force_cpu_devices(sys.argv)

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moedistill import sharding  # noqa: E402
from moedistill.config import Job  # noqa: E402
from moedistill.errors import ConfigError, UserError  # noqa: E402
from moedistill.model import resolve  # noqa: E402
from moedistill.model.config import ModelConfig  # noqa: E402
from moedistill.model.layers import Runtime  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402
from moedistill.model.shared_core import PROJS, Compression  # noqa: E402
from moedistill.training import optim, param_tree as P  # noqa: E402

GiB = 2**30
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\((.*?)\)")
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def parse_bytes(text: str) -> int:
  """'80GiB', '80GB', '85899345920' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(text))
  if not m:
    raise UserError(f"--device_memory={text!r}: expected a size such as 80GiB, 80GB or bytes")
  unit = m.group(2) or "B"
  scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20,
           "GiB": 2**30, "TiB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def _collectives(hlo_text: str):
  """(kind, operand bytes, group size or 0 for all devices) of each collective op in an HLO
  module's text (one device's program; async pairs once, at -start). Compiled HLO names
  operands without their shapes, so every definition's type is kept."""
  types = {}
  for line in hlo_text.splitlines():
    m = _DEF_RE.match(line)
    if not m:
      continue
    name, typ, op, args = m.groups()
    types[name] = typ
    kind = op.removesuffix("-start")
    if kind in COLLECTIVES:
      size = sum(_type_bytes(types.get(o, "")) for o in re.findall(r"%([\w.\-]+)", args))
      yield kind, size, _group_size(line)


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\[\d+,(\d+)\]", line)  # iota form [groups, size]<=[...]
  if m:
    return int(m.group(1))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(m.group(1).split(",")) if m and m.group(1) else 0


def collective_bytes(hlo_text: str) -> int:
  """Operand bytes of every collective op in an HLO module's text (one device's program)."""
  return sum(size for _, size, _ in _collectives(hlo_text))


def collective_traffic(hlo_text: str, n_devices: int) -> dict[str, int]:
  """Bytes each device receives, per collective kind, over groups of g devices: all-gather
  (g-1) x operand (its operand is one shard), reduce-scatter and all-to-all (g-1)/g x operand,
  all-reduce 2(g-1)/g x operand (ring), collective-permute its operand. Operand bytes alone
  would count an all-gather at 1/g of what it moves."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for kind, size, g in _collectives(hlo_text):
    g = g or n_devices
    factor = {"all-gather": g - 1, "all-reduce": 2 * (g - 1) / g,
              "collective-permute": 1 if g > 1 else 0}.get(kind, (g - 1) / g)
    out[kind] += int(size * factor)
  return out


def _type_bytes(typ: str) -> int:
  total = 0
  for dtype, dims in _SHAPE_RE.findall(typ):
    n = math.prod(int(d) for d in dims.split(",") if d)
    total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
  return total


def device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs / arrays."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def runtime(job: Job) -> Runtime:
  """The Runtime `hf.load_model` builds models with: the job's model settings, `auto` left for
  each model's constructor to resolve for the target device and that model's shapes
  (moe.resolve_runtime: the teacher and the student may get different grouped matmuls)."""
  return job.model


def lower(fn, *args):
  """fn.lower(*args), for the target platform (resolve.target()): another one than this
  host's when `--platform` cross-lowers (jax lowers without compiling or any device of it)."""
  target = resolve.target().platform
  platforms = None if target == resolve.host_target().platform else (target,)
  return fn.trace(*args).lower(lowering_platforms=platforms)


def abstract_model(cfg: ModelConfig, rt: Runtime, comp: Compression | None, mesh):
  """(graphdef, template, params): params are ShapeDtypeStructs in train's shardings."""
  model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt,
                                                     compression=comp))
  graphdef, template, params = P.split(model)
  axes = P.logical_axes(template)
  return graphdef, template, {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                              sharding=sharding.param_sharding(mesh, v.shape, axes[k]))
      for k, v in params.items()}


def cache_batch_shape(c) -> tuple[int, int, object]:
  """(entries per position, lse columns, logit dtype) of the batches a cache of config `c`
  feeds: a sampled cache's exact_k + samples weights (float32, one temperature), a packed
  cache's decoded float32 logits, a plain cache's bf16 (data/cache.py CacheReader.decode)."""
  if c.mode == "sampled":
    return c.exact_k + c.samples, 1, jnp.float32
  return c.k, len(c.temperatures), jnp.float32 if c.format == "packed" else jnp.bfloat16


def batch_specs(mesh, rows: int, seq_len: int, k: int, n_temps: int,
                logit_dtype=jnp.bfloat16) -> dict:
  """Abstract cache batch, sharded over the batch axes as train and eval feed it."""
  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  return {"tokens": sds((rows, seq_len), jnp.int32),
          "segment_ids": sds((rows, seq_len), jnp.int32),
          "topk_idx": sds((rows, seq_len, k), jnp.int32),
          "topk_logit": sds((rows, seq_len, k), logit_dtype),
          "lse": sds((rows, seq_len, n_temps), jnp.float32)}


@dataclasses.dataclass
class Program:
  """A program to compile: `lower()` gives its jax Lowered; `params`/`opt` are the bytes per
  device of the params and optimizer state it works on (for the breakdown); `resident`: bytes
  that stay on each device beside the program's own arguments (e.g. the teacher during
  compress, whose program takes one layer at a time)."""
  name: str
  lower: callable
  params: int
  opt: int = 0
  resident: int = 0


def measure(p: Program) -> dict:
  t0 = time.perf_counter()
  compiled = p.lower().compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  program = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  return {"bytes_per_device": int(program + p.resident), "params_bytes": p.params,
          "opt_state_bytes": p.opt, "temp_bytes": int(ma.temp_size_in_bytes),
          "flops_per_device": float((cost or {}).get("flops", 0.0)),
          "collective_bytes_per_device": collective_bytes(hlo),
          "collective_traffic_per_device": collective_traffic(hlo, len(jax.devices())),
          "compile_s": round(compile_s, 3)}


def _abstract_state(template, params):
  """The nnx.State of an abstract model (what programs that take `state` are lowered with)."""
  return nnx.from_flat_state([(p, v.replace(params[P.dotted(p)]) if isinstance(v, nnx.Param)
                               else v) for p, v in template])


def cache_program(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> Program:
  from moedistill.cache_logits import forward_program
  graphdef, template, params = abstract_model(cfg, rt, None, mesh)
  state = _abstract_state(template, params)
  rows = job.cache.rows_per_chunk * job.cache.chunks_per_step * jax.process_count()
  if rows % sharding.batch_divisor(mesh):
    raise ConfigError(f"config.cache.rows_per_chunk x chunks_per_step x processes = {rows} rows "
                      f"per step, not divisible by the mesh's {sharding.batch_divisor(mesh)} "
                      "batch shards")
  tok = batch_specs(mesh, rows, job.train_data.seq_len, 1, 1)["tokens"]
  # a sampled cache's forward also takes the draws' uniforms [rows, seq_len, samples]
  u = ([jax.ShapeDtypeStruct((rows, job.train_data.seq_len, job.cache.samples), jnp.float32,
                             sharding=sharding.batch_sharding(mesh, 3))]
       if job.cache.mode == "sampled" else [])
  fn = forward_program(graphdef, mesh, job)
  return Program("cache_forward", lambda: lower(fn, state, tok, tok, *u), device_bytes(params))


def compress_programs(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> list[Program]:
  """One layer's factorisation per projection; the whole teacher and the student being
  built stay resident meanwhile."""
  from moedistill.compress import factor_program
  comp = Compression(*job.ranks)
  _, _, teacher = abstract_model(cfg, rt, None, mesh)
  _, _, student = abstract_model(cfg, rt, comp, mesh)
  resident = device_bytes(teacher) + device_bytes(student)
  base = f"layers.{cfg.moe_layers[0]}.mlp.experts."
  out = []
  for q in PROJS:
    names = (f"shared_core.{q}", f"wrapper.{q}_a", f"wrapper.{q}_b")
    fn = factor_program(mesh, comp.rank(q), [student[base + n].sharding for n in names])
    w = teacher[base + f"{q}_proj"]
    out.append(Program(f"compress_{q}", lambda fn=fn, w=w: lower(fn, w, None), resident,
                       resident=resident))
  return out


def train_programs(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> list[Program]:
  """Each stage's train step: trainable params, frozen params, Adam state, one global batch;
  with train.teacher_mode=online also the teacher's params (an input of the step, so both
  models are resident and counted in its argument bytes)."""
  from moedistill.training.trainer import jit_train_step, step_config
  graphdef, template, params = abstract_model(cfg, rt, Compression(*job.ranks), mesh)
  teacher_def, teacher = None, {}
  if job.train.teacher_mode == "online":
    t_graphdef, t_template, teacher = abstract_model(cfg, rt, None, mesh)
    teacher_def = (t_graphdef, t_template)
  shapes = {k: v.shape for k, v in params.items()}
  c = job.cache
  batch = batch_specs(mesh, job.train.batch_size, job.train_data.seq_len,
                      *cache_batch_shape(c))
  out = []
  for stage in job.train.stages:
    tx, paths, _ = optim.build(stage, job.train, shapes, max(stage.steps, 1))
    tr = {k: v for k, v in params.items() if k in paths}
    fr = {k: v for k, v in params.items() if k not in paths}
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(tx.init, tr), sharding.opt_state_shardings(tx, tr, mesh))
    t_index = c.temperatures.index(stage.temperature) if stage.temperature in c.temperatures \
        else None
    fn = jit_train_step(graphdef, template, tx, step_config(job, stage, cfg, t_index), tr, opt,
                        mesh, teacher_def)
    args = (batch,) if teacher_def is None else (batch, teacher)
    # params: the student's and, online, the teacher's (both resident during the step)
    out.append(Program(f"train_{stage.name}",
                       lambda fn=fn, tr=tr, fr=fr, opt=opt: lower(fn, tr, fr, opt, *args),
                       device_bytes(params) + device_bytes(teacher), device_bytes(opt)))
  return out


def eval_program(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> Program:
  """The report's largest evaluation: a dense model (the teacher; the merged export has the
  same shapes) on one eval batch."""
  from moedistill.training import held_out
  rt = dataclasses.replace(rt, remat="none", capacity_factor=Runtime.capacity_factor)
  graphdef, template, params = abstract_model(cfg, rt, None, mesh)
  state = _abstract_state(template, params)
  c = job.cache
  batch = batch_specs(mesh, held_out.eval_batch_size(mesh, 8), job.train_data.seq_len,
                      *cache_batch_shape(c))
  fn = held_out.eval_program(graphdef, cfg, c.temperatures[0], 0, mesh=mesh,
                             mode="sampled" if c.mode == "sampled" else "bucket")
  return Program("eval", lambda: lower(fn, state, batch), device_bytes(params))


def export_program(job: Job, cfg: ModelConfig, rt: Runtime, mesh) -> Program:
  """The merged export: one layer's W_e = core + A_e B_e at a time, cast to the checkpoint
  dtype on the devices; the trained student stays resident."""
  from moedistill.hub import hf
  _, _, student = abstract_model(cfg, rt, Compression(*job.ranks), mesh)
  base = f"layers.{cfg.moe_layers[0]}.mlp.experts."
  parts = [student[base + n] for n in ("shared_core.gate", "wrapper.gate_a", "wrapper.gate_b")]
  dtype = hf.checkpoint_dtype(job.teacher)
  resident = device_bytes(student)
  return Program("export", lambda: lower(hf._merge_cast, *parts, dtype), resident,
                 resident=resident)


PROGRAMS = ("cache_forward", "compress", "train", "eval", "export")


def programs(job: Job, mesh, which=PROGRAMS) -> list[Program]:
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  sharding.check_model_fits_mesh(cfg, mesh)
  rt = runtime(job)
  builders = {"cache_forward": lambda: [cache_program(job, cfg, rt, mesh)],
              "compress": lambda: compress_programs(job, cfg, rt, mesh),
              "train": lambda: train_programs(job, cfg, rt, mesh),
              "eval": lambda: [eval_program(job, cfg, rt, mesh)],
              "export": lambda: [export_program(job, cfg, rt, mesh)]}
  return [p for name in which for p in builders[name]()]


def plan(job: Job, mesh, device_memory: int, which=PROGRAMS, show: bool = True,
         fail_fast: bool = False) -> dict:
  """Compiles the programs; returns the JSON-ready result (`fits` and per-program figures).
  `fail_fast`: raise (see `check`) at the first program that does not fit."""
  out = {}
  for p in programs(job, mesh, which):
    out[p.name] = r = measure(p)
    if fail_fast:
      check({"device_memory": device_memory, "programs": {p.name: r}}, job)
    if show and jax.process_index() == 0:
      print(f"{p.name:<16} {r['bytes_per_device'] / GiB:9.3f} GiB/device (params "
            f"{r['params_bytes'] / GiB:.3f}, opt {r['opt_state_bytes'] / GiB:.3f}, temp "
            f"{r['temp_bytes'] / GiB:.3f})  {r['flops_per_device']:.3e} FLOP  "
            f"{r['collective_bytes_per_device'] / GiB:.3f} GiB collectives  "
            f"compile {r['compile_s']:.1f}s", flush=True)
  fits = all(r["bytes_per_device"] <= device_memory for r in out.values())
  return {"fits": fits, "device_memory": int(device_memory), "programs": out}


def knobs(job: Job, name: str) -> str:
  mesh = ", ".join(f"{a}={getattr(job.mesh, a)}" for a in sharding.AXES)
  if name.startswith("train"):
    return (f"more config.train.micro_batches (now {job.train.micro_batches}), "
            f"config.model.remat=full or dots (now {job.model.remat!r}), a smaller "
            f"config.train.batch_size (now {job.train.batch_size}), or more fsdp/devices in "
            f"config.mesh ({mesh})")
  if name == "cache_forward":
    return (f"fewer rows per step (config.cache.rows_per_chunk={job.cache.rows_per_chunk} x "
            f"chunks_per_step={job.cache.chunks_per_step}), a smaller config.cache.vocab_chunk "
            f"(now {job.cache.vocab_chunk}), or more fsdp/devices in config.mesh ({mesh})")
  return f"more fsdp/devices in config.mesh ({mesh}) or config.model.param_dtype=bfloat16"


def check(result: dict, job: Job):
  """Raises UserError naming the first program that does not fit, its overshoot and knobs."""
  mem = result["device_memory"]
  for name, r in result["programs"].items():
    over = r["bytes_per_device"] - mem
    if over > 0:
      raise UserError(f"plan: {name} needs {r['bytes_per_device'] / GiB:.2f} GiB per device, "
                      f"{over / GiB:.2f} GiB over device_memory={mem / GiB:.2f} GiB; try "
                      f"{knobs(job, name)}")


def device_memory(devices) -> int:
  """Bytes per device: the accelerator's limit, or on CPU the host's memory shared by its
  local devices."""
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(jax.local_devices())


def _custom_calls(text: str) -> list[str]:
  """Custom-call targets of a lowered module's text (e.g. `__gpu$xla.gpu.triton`: a Pallas
  Triton kernel; none when the program is plain XLA)."""
  return sorted(set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)))


def _error_line(e: BaseException) -> str:
  """One line for an exception: its type and first non-empty message line, or where it was
  raised when it has no message (e.g. an AttributeError from a kernel reading a device
  property at trace time)."""
  import traceback
  msg = next((x for x in str(e).splitlines() if x.strip()), "")
  if not msg:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    msg = f"raised at {Path(frame.filename).name}:{frame.lineno}: {frame.line}"
  return f"{type(e).__name__}: {msg}"


def cross_lower(job: Job, mesh, which=PROGRAMS, show: bool = True) -> dict:
  """Lowers, without compiling, each program for resolve.target() (set by the caller): per
  program {"lowered": true, "lower_s", "custom_calls"} or {"lowered": false, "error": its
  first line}; a program that fails does not stop the others."""
  t = resolve.target()
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  from moedistill.model.moe import resolve_runtime
  resolved = {name: dataclasses.asdict(resolve_runtime(job.model, cfg, comp))
              for name, comp in (("teacher", None), ("student", Compression(*job.ranks)))}
  out = {}
  for p in programs(job, mesh, which):
    t0 = time.perf_counter()
    try:
      text = p.lower().as_text()
      out[p.name] = r = {"lowered": True, "lower_s": round(time.perf_counter() - t0, 3),
                         "custom_calls": _custom_calls(text)}
    except Exception as e:  # noqa: BLE001: the report is the point; every error is kept
      out[p.name] = r = {"lowered": False, "error": _error_line(e)}
    if show and jax.process_index() == 0:
      print(f"{p.name:<16} " + (f"lowered for {t.platform} in {r['lower_s']:.1f}s, custom calls "
                                f"{r['custom_calls']}" if r["lowered"] else
                                f"NOT lowered for {t.platform}: {r['error']}"), flush=True)
  return {"platform": t.platform, "device_kind": t.device_kind,
          "runtime": {k: {f: jnp.dtype(v).name if f.endswith("dtype") else v for f, v in r.items()}
                      for k, r in resolved.items()},
          "lowered": all(r["lowered"] for r in out.values()), "programs": out}


def _cross_main(argv, platform: str, device_kind: str):
  """plan --platform: the programs lowered for that platform from this machine, whose own
  devices only stand in for the mesh. Exit status 2 when any did not lower."""
  import contextlib

  from moedistill.cli import load_job
  from moedistill.model import pallas_gmm
  if platform not in resolve.PLATFORMS:
    raise UserError(f"--platform={platform!r}: expected one of {list(resolve.PLATFORMS)}")
  t = resolve.Target(platform, device_kind or resolve.DEFAULT_KIND[platform])
  # Pallas kernels run in interpret mode on a CPU host; for CUDA they must trace for Triton.
  triton = pallas_gmm.triton_lowering() if platform == "cuda" else contextlib.nullcontext()
  with resolve.targeting(t), triton:
    job, F = load_job(argv)  # config checks and `auto` for the target, not this host
    bad = [p for p in F.programs if p not in PROGRAMS]
    if bad or not F.programs:
      raise UserError(f"--programs={','.join(F.programs)}: expected names among {PROGRAMS}")
    result = cross_lower(job, sharding.make_mesh(job.mesh), F.programs)
  print(json.dumps(result))
  failed = [n for n, r in result["programs"].items() if not r["lowered"]]
  if failed:
    raise UserError(f"plan --platform={platform}: {len(failed)} of {len(result['programs'])} "
                    f"programs did not lower ({', '.join(failed)}); their errors are above")


def define_flags():
  from absl import flags
  flags.DEFINE_string("platform", "", f"lower (not compile) for this platform, one of "
                      f"{list(resolve.PLATFORMS)}, and report per program whether it lowered "
                      "('': compile for this machine's devices and measure)")
  flags.DEFINE_string("device_kind", "", "the target's device kind for `auto` (default: "
                      f"{resolve.DEFAULT_KIND})")
  flags.DEFINE_integer("devices", None, "compile for N forced CPU devices (default: this "
                       "machine's devices)")
  flags.DEFINE_string("device_memory", None, "bytes per device to fit, e.g. 80GiB (default: "
                      "the devices' own; 80GiB with --devices)")
  flags.DEFINE_list("programs", list(PROGRAMS), f"which programs to compile, of {PROGRAMS}")


def main(argv):
  from absl import flags

  from moedistill.cli import load_job
  if flags.FLAGS.platform:
    return _cross_main(argv, flags.FLAGS.platform, flags.FLAGS.device_kind)
  job, F = load_job(argv)
  n = len(jax.devices())
  if F.devices is not None and (F.devices < 1 or F.devices != n):
    raise UserError(f"--devices={F.devices}: expected a positive device count (jax sees {n})")
  mem = (parse_bytes(F.device_memory) if F.device_memory is not None
         else 80 * GiB if F.devices else device_memory(jax.devices()))
  bad = [p for p in F.programs if p not in PROGRAMS]
  if bad or not F.programs:
    raise UserError(f"--programs={','.join(F.programs)}: expected names among {PROGRAMS}")
  result = plan(job, sharding.make_mesh(job.mesh), mem, F.programs)
  print(json.dumps(result))
  check(result, job)


if __name__ == "__main__":
  from moedistill.cli import run
  run(main, extra_flags=(define_flags,))
