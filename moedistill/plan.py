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
--devices=N compiles for N forced CPU devices (set before jax makes its CPU client). The last stdout
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

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from moedistill import sharding
from moedistill.abstract_programs import PROGRAMS, programs
from moedistill.config import Job
from moedistill.errors import UserError
from moedistill.hlo_cost import custom_calls, error_line, measure
from moedistill.model import resolve
from moedistill.model.config import ModelConfig
from moedistill.model.shared_core import Compression

GiB = 2**30


def _force_cpu_devices(argv):
  """--devices=N must reach XLA before its CPU client is made (the first device query, after
  the imports, which make none). XLA:CPU's default scheduler optimises
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


def parse_bytes(text: str) -> int:
  """'80GiB', '80GB', '85899345920' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(text))
  if not m:
    raise UserError(f"--device_memory={text!r}: expected a size such as 80GiB, 80GB or bytes")
  unit = m.group(2) or "B"
  scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20,
           "GiB": 2**30, "TiB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


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
  if name.startswith("sample_"):  # the decode prefills every row of the step at once
    return (f"a smaller config.train.batch_size (now {job.train.batch_size}; the decode is not "
            f"micro-batched), or more fsdp/devices in config.mesh ({mesh})")
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
                         "custom_calls": custom_calls(text)}
    except Exception as e:  # noqa: BLE001: the report is the point; every error is kept
      out[p.name] = r = {"lowered": False, "error": error_line(e)}
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
  _force_cpu_devices(sys.argv)
  from moedistill.cli import run
  run(main, extra_flags=(define_flags,))
