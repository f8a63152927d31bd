"""Peak host RSS and wall time of hf.load_model on a multi-shard bf16 checkpoint loaded into an
fsdp mesh of --procs devices, against the bound checkpoint / procs + the largest tensor (what
one host must hold at least: its share and the one tensor read whole). Each device is its own
process (one CPU device each, gloo), as on that many hosts, so a process's RSS is what one host
holds; the figure is the peak RSS the load adds to its process (VmHWM, reset by
/proc/self/clear_refs right before the load, so start-up is not counted).

  python -m benchmarks.load --layers=48 --experts=128 --hidden=512 --moe_f=128 --procs=8

The checkpoint (2.58 GiB at the defaults: Qwen3-30B-A3B's layer, expert and vocab counts at a
narrow width, in 512 MB shards) is written under /tmp and deleted afterwards.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("layers", 48, "decoder layers")
flags.DEFINE_integer("experts", 128, "experts per layer")
flags.DEFINE_integer("hidden", 512, "hidden size")
flags.DEFINE_integer("moe_f", 128, "expert width")
flags.DEFINE_integer("procs", 8, "processes, one CPU device each (the fsdp axis)")
flags.DEFINE_bool("smoke", False, "2 layers, 8 experts, hidden 64, 2 processes (a test of "
                  "the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_cpu_collectives_implementation", "gloo")
path, port, n, i = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", int(n), int(i))
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
                  "peak": status("VmHWM")}), flush=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_procs(ckpt: Path, procs: int) -> dict:
  """Starts `procs` children that load `ckpt`. Each reports its own peak RSS (VmHWM, reset
  just before its load): a child's rusage maxrss would also hold this parent's RSS at fork
  time, which exec carries over."""
  port, t0 = free_port(), time.perf_counter()
  ps = [subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt), str(port), str(procs), str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=common.host_rss_child_env(), cwd=tempfile.gettempdir())
        for i in range(procs)]
  rows = []
  for p in ps:
    out, err = p.communicate()
    if p.returncode:
      raise SystemExit(f"child failed ({p.returncode}): {err.decode()[-2000:]}")
    rows.append(json.loads(out.decode().strip().splitlines()[-1]))
  return {"peak_rss": max(r["peak"] for r in rows),
          "load_rss": max(r["peak"] - r["before"] for r in rows),
          "load_s": round(max(r["load_s"] for r in rows), 2),
          "wall_s": round(time.perf_counter() - t0, 2),
          "device_bytes": max(r["device_bytes"] for r in rows)}


def main(argv):
  del argv
  if F.smoke:
    F.layers, F.experts, F.hidden, F.moe_f, F.procs = 2, 8, 64, 32, 2
  tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
  try:
    sizes = common.write_checkpoint(
        tmp / "ckpt", common.checkpoint_config(F.layers, F.experts, F.hidden, F.moe_f))
    bound = sizes["bytes"] / F.procs + sizes["largest_tensor"]
    r = run_procs(tmp / "ckpt", F.procs)
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    print(f"checkpoint {gib(sizes['bytes'])} in {sizes['shards']} shards, largest tensor "
          f"{gib(sizes['largest_tensor'])}; {F.procs} processes x 1 CPU device, "
          f"fsdp={F.procs}: peak RSS added by the load, per process {gib(r['load_rss'])} "
          f"(whole process {gib(r['peak_rss'])}); bound {gib(bound)}: ratio "
          f"{r['load_rss'] / bound:.2f}; held on its device {gib(r['device_bytes'])}; load "
          f"{r['load_s']:.1f} s", flush=True)
    common.emit("load", {"checkpoint": sizes, "procs": F.procs, "bound": int(bound),
                         "load_rss_over_bound": round(r["load_rss"] / bound, 3), **r}, F.out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
