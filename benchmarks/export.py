"""Peak host RSS and wall time of a merged export (hf.save_model, as `moedistill.export` and
`train` run it) from a multi-shard bf16 native student checkpoint, in one run:
  stream   each layer's experts merged once on device, tensors streamed to disk;
  library  the same with each shard written by the safetensors library's save_file (the
           whole shard in memory first): the baseline.
Each runs in a child process on one CPU device; the model is loaded first and the peak RSS is
reset (/proc/self/clear_refs) before the export, so the figure is what the export adds on the
host, against the largest layer of the output (and the largest tensor).

  python -m benchmarks.export --layers=8 --experts=128 --hidden=128 --moe_f=512 --rank=16
  python -m benchmarks.export --layers=48

Checkpoint and exports go under /tmp and are deleted afterwards.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import common

flags.DEFINE_integer("layers", 8, "decoder layers")
flags.DEFINE_integer("experts", 128, "experts per layer")
flags.DEFINE_integer("hidden", 128, "hidden size")
flags.DEFINE_integer("moe_f", 512, "expert width")
flags.DEFINE_integer("rank", 16, "shared-core rank of the student")
flags.DEFINE_integer("max_shard_bytes", 5 * 2**30, "the export's shard cap")
flags.DEFINE_bool("smoke", False, "2 layers, 8 experts, hidden 64 (a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS

CHILD = r"""
import json, sys, time
import jax.numpy as jnp
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
print(json.dumps({"export_s": round(time.perf_counter() - t0, 3),
                  "added_rss": status("VmHWM") - before}))
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


def run(ckpt: Path, out: Path, mode: str, shard: int) -> dict:
  r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), mode, str(shard)],
                     capture_output=True, text=True, env=common.host_rss_child_env(),
                     cwd=tempfile.gettempdir())
  if r.returncode:
    raise SystemExit(f"{mode} failed: {r.stderr[-2000:]}")
  row = json.loads(r.stdout.strip().splitlines()[-1])
  row["out_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
  shutil.rmtree(out)
  return row


def main(argv):
  del argv
  if F.smoke:
    F.layers, F.experts, F.hidden, F.moe_f, F.rank = 2, 8, 64, 32, 4
  from moedistill.model.shared_core import Compression
  cfg = common.checkpoint_config(F.layers, F.experts, F.hidden, F.moe_f)
  tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
  try:
    sizes = common.write_checkpoint(tmp / "ckpt", cfg, Compression(F.rank, F.rank, F.rank),
                                    shard_bytes=16 << 20)
    layer, tensor = layer_bytes(cfg)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"student {mib(sizes['bytes'])} in {sizes['shards']} shards; merged output: largest "
          f"layer {mib(layer)}, largest tensor {mib(tensor)}; max_shard_bytes "
          f"{F.max_shard_bytes}", flush=True)
    res = {}
    for mode in ("stream", "library"):
      r = res[mode] = run(tmp / "ckpt", tmp / "out", mode, F.max_shard_bytes)
      r["added_rss_over_largest_layer"] = round(r["added_rss"] / layer, 2)
      print(f"{mode:>8}: export {r['export_s']:.1f} s, peak RSS added {mib(r['added_rss'])} = "
            f"{r['added_rss'] / layer:.2f} x largest layer; wrote {mib(r['out_bytes'])}",
            flush=True)
    res["stream_over_library"] = {
        "time": round(res["stream"]["export_s"] / res["library"]["export_s"], 3),
        "rss": round(res["stream"]["added_rss"] / res["library"]["added_rss"], 3)}
    common.emit("export", {"largest_layer": layer, "largest_tensor": tensor, "student": sizes,
                           **res}, F.out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
