"""Peak host RSS and wall time of a merged export (hf.save_model, as `moedistill.export` and
`train` run it) from a multi-shard bf16 native student checkpoint, in one run:
  stream   this tree (each layer's experts merged once on device, tensors streamed to disk);
  library  this tree with each shard written by the safetensors library's save_file (the
           whole shard in memory first);
  old      the export of an earlier commit (`git archive`; merge recomputed per expert key).
Each runs in a child process on one CPU device; the model is loaded first and the peak RSS is
reset (/proc/self/clear_refs) before the export, so the figure is what the export adds on the
host, against the largest layer of the output (and the largest tensor).

  python scripts/bench_export.py [--layers 8 --experts 128 --hidden 128 --moe_f 512 --rank 16]
      [--max_shard_bytes 5368709120] [--baseline_rev 674eb88] [--skip_old]

Checkpoint and exports go under /tmp and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_load import ROOT, code_at, narrow_config, write_checkpoint

CHILD = r"""
import json, sys, time
import jax.numpy as jnp
import moedistill
from moedistill.hub import hf, safetensors_io as st
from moedistill.model.layers import Runtime
ckpt, out, mode, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "library":
  class Buffered:  # the library's save_file: every tensor of the shard, then one write
    def __init__(self, path, specs):
      self.path, self.tensors = path, {}
    def add(self, key, a):
      self.tensors[key] = a.copy()
    def close(self):
      st.write(self.path, self.tensors)
  st.StreamWriter = Buffered
def status(field):
  return int(dict(l.split(":", 1) for l in open("/proc/self/status"))[field].split()[0]) * 1024
model, _ = hf.load_model(ckpt, Runtime(param_dtype=jnp.bfloat16))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
t0 = time.perf_counter()
hf.save_model(model, out, merged=True, dtype=jnp.bfloat16, max_shard_bytes=shard)
print(json.dumps({"export_s": time.perf_counter() - t0, "added_rss": status("VmHWM") - before,
                  "src": moedistill.__file__}))
"""


def layer_bytes(cfg, itemsize=2) -> tuple[int, int]:
  """(largest layer, largest tensor) of the merged output, in bytes."""
  import numpy as np
  from flax import nnx
  from moedistill.hub import hf
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  abstract = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))
  shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  per_layer, largest = {}, 0
  for e in hf.key_table(cfg):
    n = int(np.prod(hf._hf_shape(e, shapes[e.path]))) * itemsize
    largest = max(largest, n)
    if e.path[0] == "layers":
      per_layer[e.path[1]] = per_layer.get(e.path[1], 0) + n
  return max(per_layer.values()), largest


def run(src: Path, ckpt: Path, out: Path, mode: str, shard: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(src), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), mode, str(shard)],
                     capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
  if r.returncode:
    raise SystemExit(f"{mode} failed: {r.stderr[-2000:]}")
  row = json.loads(r.stdout.strip().splitlines()[-1])
  assert row["src"].startswith(str(src)), row["src"]
  row["out_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
  shutil.rmtree(out)
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--experts", type=int, default=128)
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--moe_f", type=int, default=512)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--max_shard_bytes", type=int, default=5 * 2**30)
  ap.add_argument("--baseline_rev", default="674eb88", help="commit of the old export")
  ap.add_argument("--skip_old", action="store_true", help="(slow at many layers)")
  a = ap.parse_args()
  from moedistill.model.shared_core import Compression
  cfg = narrow_config(a)
  tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
  try:
    sizes = write_checkpoint(tmp / "ckpt", cfg, Compression(a.rank, a.rank, a.rank),
                             shard_bytes=16 << 20)
    layer, tensor = layer_bytes(cfg)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"student {mib(sizes['bytes'])} in {sizes['shards']} shards; merged output: largest "
          f"layer {mib(layer)}, largest tensor {mib(tensor)}; max_shard_bytes {a.max_shard_bytes}")
    modes = [("stream", ROOT), ("library", ROOT)]
    if not a.skip_old:
      modes.append(("old", code_at(a.baseline_rev, tmp / "old")))
    res = {}
    for mode, src in modes:
      r = res[mode] = run(src, tmp / "ckpt", tmp / "out", mode, a.max_shard_bytes)
      print(f"{mode:>8}: export {r['export_s']:.1f} s, peak RSS added {mib(r['added_rss'])} = "
            f"{r['added_rss'] / layer:.2f} x largest layer; wrote {mib(r['out_bytes'])}")
    for mode in res:
      if mode != "stream":
        print(f"stream/{mode}: time {res['stream']['export_s'] / res[mode]['export_s']:.3f}x, "
              f"RSS {res['stream']['added_rss'] / res[mode]['added_rss']:.3f}x")
    print(json.dumps({"largest_layer": layer, "largest_tensor": tensor, "student": sizes, **res}))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
