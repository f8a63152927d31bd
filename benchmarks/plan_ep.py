"""The whole train step under expert parallelism, as `python -m moedistill.plan` measures it
(plan.plan, in this process): a teacher config.json with Qwen3-30B-A3B's widths (hidden 2048,
128 experts top-8, vocab 151936) and few layers, the `qwen3_30b_a3b` preset of
configs/two_stage.py (bf16 compute, remat full, rank-128 student) with unscanned layers and
one micro-batch (XLA's cost analysis counts a loop body once), stage `all`, on 8 forced CPU
devices and on one. AOT compile only, nothing runs.

  python -m benchmarks.plan_ep [--backend=capacity|sorted] [--ep_capacity_factor=F]
      [--rows=8 --seq=256] [--layers=4] [--meshes=data=8,fsdp=8,expert=8]
      [--program=train|cache_forward]

--program=cache_forward: the teacher cache forward instead (dense experts, no backward), on
--rows rows per step (config.cache.rows_per_chunk, one chunk per step).

Prints per mesh: FLOPs per device and their ratio to (one device's FLOPs / 8), bytes per
device, collective operand bytes per device for the step and per layer, and per layer the
bytes each device receives (plan's collective_traffic: an all-gather's operand is one shard,
so operand bytes undercount it g-1 times), by kind. Per layer = (step at L layers - step at
L/2 layers) / (L/2): what each decoder layer adds, without the embedding, the lm_head and the
loss. The baseline of each mesh is one device's step in the same run (x ideal).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import common

MESHES = {"one device": (1, 1, 1, 1), "data=8": (8, 1, 1, 1), "fsdp=8": (1, 8, 1, 1),
          "expert=8": (1, 1, 8, 1), "data=2+expert=4": (2, 1, 4, 1)}
GiB = 2**30

flags.DEFINE_enum("backend", "capacity", ["capacity", "sorted", "ragged"], "MoE backend")
flags.DEFINE_float("ep_capacity_factor", 0.0, "config.model.ep_capacity_factor")
flags.DEFINE_integer("rows", 8, "rows per step (train batch; cache rows per chunk)")
flags.DEFINE_integer("seq", 256, "tokens per row")
flags.DEFINE_integer("layers", 4, "decoder layers, even; per layer = difference to half")
flags.DEFINE_list("meshes", ["data=8", "fsdp=8", "expert=8"],
                  f"meshes of 8 devices, of {list(MESHES)[1:]}")
flags.DEFINE_enum("program", "train", ["train", "cache_forward"], "which program to compile")
flags.DEFINE_bool("smoke", False, "a small MoE, 2 layers, 8 x 32 tokens, mesh expert=8 only, "
                  "the cache forward with `sorted` (a third of the train step's compile "
                  "time; a test of the script)")
flags.DEFINE_string("out", "", "also write the JSON record here")
F = flags.FLAGS


def teacher_dir(layers: int, root: Path) -> Path:
  c = (common.tiny_config(layers) if F.smoke
       else common.narrow_config(layers, 2048, 32, 4, 128, 768, 6144))
  d = root / f"teacher_{layers}l"
  d.mkdir(exist_ok=True)
  (d / "config.json").write_text(json.dumps(c.to_hf_dict()))
  return d


def job(teacher: Path, shape):
  """The `qwen3_30b_a3b` preset with this benchmark's overrides, as plan's flags would set."""
  from moedistill.config import job_from_config
  c = common.demo_config("qwen3_30b_a3b")
  c.teacher = str(teacher)
  c.cache.rows_per_chunk, c.cache.chunks_per_step = F.rows, 1
  c.model.scan_layers, c.train.micro_batches, c.train.batch_size = False, 1, F.rows
  c.data.seq_len, c.stage_order = F.seq, "all"
  c.model.moe_backend, c.model.ep_capacity_factor = F.backend, F.ep_capacity_factor
  if F.smoke:
    c.student.rank = 8
  for axis, size in zip(("data", "fsdp", "expert", "tensor"), shape):
    setattr(c.mesh, axis, size)
  return job_from_config(c)


def plan(teacher: Path, mesh_name: str) -> dict:
  import jax
  from moedistill import plan as moe_plan, sharding
  shape = MESHES[mesh_name]
  j = job(teacher, shape)
  n = shape[0] * shape[1] * shape[2] * shape[3]
  mesh = sharding.make_mesh(j.mesh, jax.devices()[:n])
  # figures, not a fit: 1 TiB lets one device hold the whole model
  res = moe_plan.plan(j, mesh, 2**40, (F.program,), show=False)
  return res["programs"]["train_all" if F.program == "train" else F.program]


def main(argv):
  del argv
  if F.smoke:
    F.rows, F.seq, F.layers, F.meshes = 8, 32, 2, ["expert=8"]
    F.program, F.backend = "cache_forward", "sorted"
  unknown = [m for m in F.meshes if m not in MESHES or m == "one device"]
  if unknown:
    raise app.UsageError(f"--meshes: {unknown[0]!r} is none of {list(MESHES)[1:]}")
  if F.program == "cache_forward" and F.backend == "capacity":
    raise app.UsageError("--program=cache_forward: the teacher cache needs a dropless "
                         "backend, --backend=sorted or ragged")
  common.force_cpu_devices(8)
  half = F.layers // 2
  res = {"program": F.program, "layers": F.layers, "rows": F.rows, "seq": F.seq,
         "backend": F.backend, "ep_capacity_factor": F.ep_capacity_factor, "meshes": {}}
  with tempfile.TemporaryDirectory() as tmp:
    full, part = (teacher_dir(n, Path(tmp)) for n in (F.layers, half))
    what = "train step (stage all)" if F.program == "train" else F.program
    print(f"{what}, {'a small MoE' if F.smoke else 'Qwen3-30B-A3B widths'}, {F.layers} layers "
          f"unscanned, {F.rows}x{F.seq} tokens, bf16 compute, backend {F.backend}, "
          f"ep_capacity_factor {F.ep_capacity_factor}", flush=True)
    one = plan(full, "one device")
    ideal = one["flops_per_device"] / 8
    res["one_device_flops"] = one["flops_per_device"]
    print(f"one device: {one['flops_per_device']:.4e} FLOP, /8 = {ideal:.4e}", flush=True)
    print(f"{'mesh':16} {'FLOP/dev':>10} {'x ideal':>7} {'GiB/dev':>8} "
          f"{'operand GiB/step':>16} {'/layer':>7} {'received GiB/layer':>18}  by kind")
    for name in F.meshes:
      a, b = plan(full, name), plan(part, name)
      per = lambda key: (a[key] - b[key]) / (F.layers - half)  # noqa: E731
      kinds = {k: (a["collective_traffic_per_device"][k] - b["collective_traffic_per_device"][k])
               / (F.layers - half) for k in a["collective_traffic_per_device"]}
      res["meshes"][name] = {
          "flops_per_device": a["flops_per_device"],
          "x_ideal": round(a["flops_per_device"] / ideal, 3),
          "gib_per_device": round(a["bytes_per_device"] / GiB, 3),
          "operand_gib_per_step": round(a["collective_bytes_per_device"] / GiB, 3),
          "operand_gib_per_layer": round(per("collective_bytes_per_device") / GiB, 3),
          "received_gib_per_layer": {k: round(v / GiB, 3) for k, v in kinds.items() if v}}
      print(f"{name:16} {a['flops_per_device']:10.4e} {a['flops_per_device'] / ideal:7.3f} "
            f"{a['bytes_per_device'] / GiB:8.2f} {a['collective_bytes_per_device'] / GiB:16.3f} "
            f"{per('collective_bytes_per_device') / GiB:7.3f} {sum(kinds.values()) / GiB:18.3f}"
            "  " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in kinds.items() if v), flush=True)
  common.emit("plan_ep", res, F.out)


if __name__ == "__main__":
  app.run(main)
