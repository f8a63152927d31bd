"""What a compiled or lowered program costs, read off XLA: bytes per device (memory analysis),
FLOPs (cost analysis), collective bytes and traffic per device (parsed from the compiled HLO
text, whose collectives cost analysis does not report), custom calls of a lowered module."""
from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\((.*?)\)")
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


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


def custom_calls(text: str) -> list[str]:
  """Custom-call targets of a lowered module's text (e.g. `__gpu$xla.gpu.triton`: a Pallas
  Triton kernel; none when the program is plain XLA)."""
  return sorted(set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)))


def error_line(e: BaseException) -> str:
  """One line for an exception: its type and first non-empty message line, or where it was
  raised when it has no message (e.g. an AttributeError from a kernel reading a device
  property at trace time)."""
  import traceback
  msg = next((x for x in str(e).splitlines() if x.strip()), "")
  if not msg:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    msg = f"raised at {Path(frame.filename).name}:{frame.lineno}: {frame.line}"
  return f"{type(e).__name__}: {msg}"
