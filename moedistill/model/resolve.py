"""Which MoE backend and attention `auto` means, and which ones a platform can run.

`resolve(platform, device_kind, shapes)` is a pure function (no devices touched): the table in
docs/gpu.md is its output. `target()` is what it is asked about: this host's first device, or
the device `python -m moedistill.plan --platform=...` lowers for (`targeting`), so programs
cross-lowered from a CPU machine resolve as they would on the GPU.

Every `auto` choice is exact and dropless (`capacity` is never chosen):
  cuda, Ampere or newer: `pallas` grouped matmul (Triton lowering, any shapes: it pads K and N
    to its blocks) and `pallas` flash attention (O(S) memory with segment ids). On Hopper
    (H100/H200/H800/H20) `mgpu` instead when the Mosaic GPU kernels' divisibility constraints
    hold for every grouped matmul of the model (`mgpu_misfit`); otherwise `pallas` and `why`
    says which matmul does not fit. cuDNN attention is never chosen: with segment ids jax
    0.10.2 builds a dense [b, 1, t, t] mask for it.
  cuda before Ampere, rocm: `ragged` (jax.lax.ragged_dot: exact, dense masked on GPU) and
    attention `auto` (plain up to attention_block positions, blocked beyond; per call).
  tpu: `ragged`; attention `auto`.  cpu: `sorted`; attention `auto`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Device kinds as jax reports them, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA GH200 480GB".
_HOPPER = re.compile(r"\bG?H(100|200|800|20)\b")
# NVIDIA GPUs below compute capability 8.0 (no bf16 tensor cores; Pallas Triton and cuDNN flash
# attention need sm80+ here).
_PRE_AMPERE = re.compile(r"\b(V100|T4|P100|P40|P4|K80|K40|M60|TITAN V|TITAN RTX|Quadro RTX"
                         r"|RTX 20[0-9]0|GTX)\b", re.I)


@dataclasses.dataclass(frozen=True)
class Target:
  platform: str     # one of PLATFORMS
  device_kind: str  # jax's Device.device_kind, e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"


# Example device kinds for `plan --platform` without --device_kind.
DEFAULT_KIND = {"cpu": "cpu", "cuda": "NVIDIA H100 80GB HBM3", "rocm": "AMD Instinct MI300X",
                "tpu": "TPU v5 lite"}

_override: Target | None = None


def host_target() -> Target:
  import jax
  try:
    d = jax.devices()[0]
  except RuntimeError:
    return Target("cpu", "cpu")
  platform = d.platform
  if platform == "gpu":
    platform = "rocm" if "rocm" in d.client.platform_version.lower() else "cuda"
  return Target(platform, d.device_kind)


def target() -> Target:
  """The device programs are built for: the `targeting` one, else this host's first device."""
  return _override or host_target()


@contextlib.contextmanager
def targeting(t: Target):
  """Within: config checks and `auto` resolve for `t` instead of this host (cross-lowering)."""
  global _override
  old, _override = _override, t
  try:
    yield t
  finally:
    _override = old


def is_hopper(device_kind: str) -> bool:
  return bool(_HOPPER.search(device_kind))


def is_ampere_or_newer(device_kind: str) -> bool:
  return not _PRE_AMPERE.search(device_kind)


def gmm_shapes(cfg, comp=None) -> tuple[tuple[str, int, int], ...]:
  """(name, K, N) of every grouped matmul of a model, weights [e, K, N]: the teacher's experts
  (gate and up as one d -> 2f, down f -> d) or, with a Compression, the shared-core student's
  wrappers (A: d -> r, B: r -> f for gate and up; A: f -> r, B: r -> d for down; the shared
  core runs as plain matmuls)."""
  d, f = cfg.hidden_size, cfg.moe_intermediate_size
  if comp is None:
    return (("experts gate_up", d, 2 * f), ("experts down", f, d))
  out = []
  for p in ("gate", "up", "down"):
    r = comp.rank(p)
    din, dout = (f, d) if p == "down" else (d, f)
    out += [(f"wrapper {p}_a", din, r), (f"wrapper {p}_b", r, dout)]
  return tuple(out)


def mgpu_misfit(shapes, kernel=None) -> str | None:
  """None when the Mosaic GPU kernels (gmm.MosaicGpuKernel's blocks) accept every grouped
  matmul [e, K, N] in `shapes`, forward and backward; else the first that does not, and why.
  jax 0.10.2's constraints (jax/experimental/pallas/ops/gpu): ragged_dot needs the contracting
  dim a multiple of block_k ("k must be a multiple of block_k") and writes whole block_n
  column tiles (its own autotuner skips n % block_n != 0); transposed_ragged_dot needs m and n
  multiples of block_m and block_n. Rows are padded by the wrapper and need nothing.
    forward  x[m, K] @ w[K, N]:        K % fwd.block_k,    N % fwd.block_n
    dx       dy[m, N] @ w^T[N, K]:     N % bwd_dx.block_k, K % bwd_dx.block_n
    dW       x^T[K, m] @ dy[m, N]:     K % bwd_dw.block_m, N % bwd_dw.block_n"""
  if kernel is None:
    from moedistill.model.gmm import MosaicGpuKernel
    kernel = MosaicGpuKernel()
  for name, k, n in shapes:
    needs = (("K", k, kernel.fwd.block_k, "forward block_k"),
             ("N", n, kernel.fwd.block_n, "forward block_n"),
             ("N", n, kernel.bwd_dx.block_k, "dx block_k"),
             ("K", k, kernel.bwd_dx.block_n, "dx block_n"),
             ("K", k, kernel.bwd_dw.block_m, "dW block_m"),
             ("N", n, kernel.bwd_dw.block_n, "dW block_n"))
    for dim, size, block, what in needs:
      if size % block:
        return (f"{name} [{k} -> {n}]: {dim}={size} is not a multiple of the Mosaic GPU "
                f"{what}={block}")
  return None


@dataclasses.dataclass(frozen=True)
class Resolved:
  moe_backend: str
  attention: str  # an attention impl, or `auto`: plain up to attention_block, blocked beyond
  why: str | None = None  # set when the fastest path was passed over: the log line


def resolve(platform: str, device_kind: str, shapes=None, dtype: str = "bfloat16") -> Resolved:
  """What `auto` means on (platform, device kind) for a model whose grouped matmuls are
  `shapes` (gmm_shapes; None: unknown, so `mgpu` cannot be checked and is not chosen),
  computing in `dtype` (a name; `mgpu` only for 16-bit: Hopper's wgmma rounds float32
  operands to tf32)."""
  if platform == "cuda":
    if not is_ampere_or_newer(device_kind):
      return Resolved("ragged", "auto", f"{device_kind} is older than Ampere (sm80), which the "
                      "Pallas Triton kernels need: exact jax.lax.ragged_dot and XLA attention")
    if is_hopper(device_kind):
      misfit = ("the model's grouped-matmul shapes are unknown" if shapes is None
                else f"{dtype} compute: Mosaic GPU's wgmma rounds float32 operands to tf32"
                if dtype not in ("bfloat16", "float16") else mgpu_misfit(shapes))
      if misfit is None:
        return Resolved("mgpu", "pallas")
      return Resolved("pallas", "pallas", f"moe_backend=auto on {device_kind}: pallas, not "
                      f"mgpu, because {misfit}")
    return Resolved("pallas", "pallas")
  if platform == "cpu":
    return Resolved("sorted", "auto")
  if platform == "tpu":
    return Resolved("ragged", "auto")
  if platform == "rocm":
    return Resolved("ragged", "auto", "ROCm: the Pallas kernels are not checked there; exact "
                    "jax.lax.ragged_dot and XLA attention")
  raise ValueError(f"platform={platform!r}: expected one of {PLATFORMS}")


def unsupported(field: str, value: str, platform: str, device_kind: str) -> str | None:
  """Why `model.<field>=<value>` cannot run on (platform, device kind), or None when it can.
  The Pallas kernels run on NVIDIA GPUs (Ampere on) and, in interpret mode, on CPU."""
  nvidia = platform == "cuda" and is_ampere_or_newer(device_kind)
  needs = {
      ("moe_backend", "mgpu"): (platform == "cuda" and is_hopper(device_kind),
                                "needs an NVIDIA Hopper GPU (H100, H200, H800, H20)"),
      ("moe_backend", "pallas"): (nvidia or platform == "cpu", "needs an NVIDIA GPU of "
                                  "compute capability >= 8.0 (or CPU, interpret mode)"),
      ("attention", "cudnn"): (nvidia, "needs an NVIDIA GPU (compute capability >= 8.0)"),
      ("attention", "pallas"): (nvidia or platform == "cpu", "needs an NVIDIA GPU of compute "
                                "capability >= 8.0 (or CPU, interpret mode)"),
  }
  ok, need = needs.get((field, value), (True, ""))
  return None if ok else f"{need}; the target is {platform} ({device_kind})"


def drops(rt, expert_shards: int = 1) -> str | None:
  """Why a Runtime may drop token copies (so its outputs are inexact), or None when dropless:
  `capacity` drops copies past each expert's slots; ep_capacity_factor > 0 bounds the expert
  all-to-all buffers when the mesh has an expert axis (overflow dropped)."""
  if rt.moe_backend == "capacity":
    return (f"config.model.moe_backend='capacity' drops token copies past each expert's "
            f"capacity (capacity_factor={rt.capacity_factor}); expected a dropless backend: "
            "auto, sorted, ragged, pallas or mgpu")
  if rt.ep_capacity_factor > 0 and expert_shards > 1:
    return (f"config.model.ep_capacity_factor={rt.ep_capacity_factor} drops token copies that "
            f"overflow the expert all-to-all buffers (mesh.expert={expert_shards}); expected 0 "
            "(worst-case buffers, dropless)")
  return None


def dropless(rt):
  """rt with its dropping settings replaced by exact ones (`capacity` -> `auto`, bounded expert
  buffers -> worst case): for figures that must be exact even when training trades drops for
  speed (the report after `train`)."""
  return dataclasses.replace(
      rt, moe_backend="auto" if rt.moe_backend == "capacity" else rt.moe_backend,
      ep_capacity_factor=0.0)


def record(rt) -> dict:
  """What a cache's metadata.json keeps of the Runtime that computed it: the resolved MoE
  backend (and capacity_factor where it is `capacity`), attention, compute dtype, device."""
  import jax.numpy as jnp
  t = target()
  out = {"moe_backend": rt.moe_backend, "attention": rt.attention,
         "dtype": jnp.dtype(rt.dtype).name, "platform": t.platform, "device_kind": t.device_kind}
  if rt.moe_backend == "capacity":
    out["capacity_factor"] = rt.capacity_factor
  return out
