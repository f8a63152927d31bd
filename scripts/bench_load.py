"""Peak host RSS and wall time of hf.load_model on a multi-shard bf16 checkpoint loaded into an
8-device fsdp mesh: today's loader against the loader of an earlier commit (`git archive`),
in one run. Each device is its own process (one CPU device each, gloo), as on 8 hosts, so a
process's RSS is what one host holds. The bound: checkpoint / 8 + the largest tensor, for the
peak RSS a load adds to its process (VmHWM, reset by /proc/self/clear_refs right before).

  python scripts/bench_load.py [--layers 48 --experts 128 --hidden 512 --moe_f 128]
      [--baseline_rev 674eb88] [--procs 8]

The checkpoint (2.8 GB at the defaults: Qwen3-30B-A3B's layer, expert and vocab counts at a
narrow width, in 512 MB shards) is written under /tmp and deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_cpu_collectives_implementation", "gloo")
path, port, n, i = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", int(n), int(i))
import moedistill
from moedistill import sharding
from moedistill.hub import hf
from moedistill.model.layers import Runtime
mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=int(n)))
def status(field):
  return int(dict(l.split(":", 1) for l in open("/proc/self/status"))[field].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS restarts here: start-up is not counted
before = status("VmRSS")
t0 = time.perf_counter()
model, _ = hf.load_model(path, Runtime(param_dtype=jnp.bfloat16),
                         put=sharding.sharded_put(mesh))
held = sum(s.data.nbytes for v in hf.state_arrays(model).values() for s in v.addressable_shards)
print(json.dumps({"load_s": time.perf_counter() - t0, "device_bytes": held, "before": before,
                  "peak": status("VmHWM"),
                  "src": moedistill.__file__}), flush=True)
"""


def narrow_config(a):
  sys.path.insert(0, str(ROOT))
  from moedistill.model.config import qwen3_30b_a3b
  import dataclasses
  return dataclasses.replace(
      qwen3_30b_a3b(), num_hidden_layers=a.layers, num_experts=a.experts, hidden_size=a.hidden,
      moe_intermediate_size=a.moe_f, intermediate_size=4 * a.hidden, num_attention_heads=4,
      num_key_value_heads=2, head_dim=64)


def write_checkpoint(path: Path, cfg, comp=None, shard_bytes: int = 512 << 20) -> dict:
  """A random bf16 checkpoint (HF layout; native shared-core keys with `comp`), generated
  tensor by tensor into shards plus an index. Returns sizes: total and largest tensor."""
  import ml_dtypes
  import numpy as np
  from flax import nnx
  from moedistill.hub import hf, safetensors_io as st
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  abstract = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), compression=comp))
  shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  table = [(e.hf_key, hf._hf_shape(e, shapes[e.path])) for e in hf.key_table(cfg, comp)]
  shards, size = [[]], 0
  for key, shape in table:
    n = int(np.prod(shape)) * 2
    if shards[-1] and size + n > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, shape))
    size += n
  path.mkdir(parents=True)
  rng, weight_map = np.random.default_rng(0), {}
  for i, group in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    st.write(path / name, {k: (rng.standard_normal(s, np.float32) * 0.02).astype(
        ml_dtypes.bfloat16) for k, s in group})
    weight_map.update({k: name for k, _ in group})
  sizes = [int(np.prod(s)) * 2 for _, s in table]
  (path / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                           "weight_map": weight_map}))
  raw = {**cfg.to_hf_dict(), "torch_dtype": "bfloat16"}
  if comp is not None:
    raw["compression"] = comp.to_dict()
  (path / "config.json").write_text(json.dumps(raw))
  return {"bytes": sum(sizes), "largest_tensor": max(sizes), "shards": len(shards)}


def code_at(rev: str, dest: Path) -> Path:
  """The moedistill package as of `rev`, extracted (not checked out) into dest."""
  dest.mkdir(parents=True)
  blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "moedistill"], check=True,
                        capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(dest)], input=blob, check=True)
  return dest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_procs(src: Path, ckpt: Path, procs: int) -> dict:
  """Starts `procs` children that load `ckpt` with the moedistill in `src`. Each reports its
  own peak RSS (VmHWM, reset just before its load): a child's rusage maxrss would also hold
  this parent's RSS at fork time, which exec carries over."""
  env = dict(os.environ, PYTHONPATH=str(src), JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONWARNINGS="ignore")
  port, t0 = free_port(), time.perf_counter()
  ps = [subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt), str(port), str(procs), str(i),
                          ], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd=tempfile.gettempdir()) for i in range(procs)]
  rows = []
  for p in ps:
    out, err = p.communicate()
    if p.returncode:
      raise SystemExit(f"child failed ({p.returncode}): {err.decode()[-2000:]}")
    rows.append(json.loads(out.decode().strip().splitlines()[-1]))
  assert all(r["src"].startswith(str(src)) for r in rows), rows[0]["src"]
  return {"peak_rss": max(r["peak"] for r in rows),
          "load_rss": max(r["peak"] - r["before"] for r in rows),
          "load_s": max(r["load_s"] for r in rows),
          "wall_s": time.perf_counter() - t0, "device_bytes": max(r["device_bytes"] for r in rows)}


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=48)
  ap.add_argument("--experts", type=int, default=128)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--moe_f", type=int, default=128)
  ap.add_argument("--procs", type=int, default=8)
  ap.add_argument("--baseline_rev", default="674eb88", help="commit of the old loader")
  a = ap.parse_args()
  tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
  try:
    sizes = write_checkpoint(tmp / "ckpt", narrow_config(a))
    old = code_at(a.baseline_rev, tmp / "old")
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    print(f"checkpoint {gib(sizes['bytes'])} in {sizes['shards']} shards, largest tensor "
          f"{gib(sizes['largest_tensor'])}; {a.procs} processes x 1 CPU device, fsdp={a.procs}")
    bound = sizes["bytes"] / a.procs + sizes["largest_tensor"]
    res = {}
    for name, src in (("old", old), ("new", ROOT)):
      r = res[name] = run_procs(src, tmp / "ckpt", a.procs)
      print(f"{name:>4} loader ({'rev ' + a.baseline_rev if name == 'old' else 'this tree'}): "
            f"peak RSS added by the load, per process {gib(r['load_rss'])} (whole process "
            f"{gib(r['peak_rss'])}); bound ckpt/{a.procs} + largest tensor {gib(bound)}: "
            f"ratio {r['load_rss'] / bound:.2f}; held on its device {gib(r['device_bytes'])}; "
            f"load {r['load_s']:.1f} s")
    print(f"new/old: load RSS {res['new']['load_rss'] / res['old']['load_rss']:.2f}x, load time "
          f"{res['new']['load_s'] / res['old']['load_s']:.2f}x")
    print(json.dumps({"checkpoint": sizes, "bound": bound, **res}))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
