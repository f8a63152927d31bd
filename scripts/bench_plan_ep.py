"""The whole train step under expert parallelism, as `python -m moedistill.plan` reports it: a
teacher config.json with Qwen3-30B-A3B's widths (hidden 2048, 128 experts top-8, vocab 151936)
and few layers, the `qwen3_30b_a3b` preset (bf16 compute, remat full, rank-128 student) with
unscanned layers and one micro-batch (XLA's cost analysis counts a loop body once), stage
`all`, on 8 forced CPU devices and on one. AOT compile only, nothing runs.

  python scripts/bench_plan_ep.py [--backend capacity|sorted] [--ep_capacity_factor F]
      [--rows 8 --seq 256] [--layers 4] [--meshes data=8,fsdp=8,expert=8]
      [--program train|cache_forward]

--program cache_forward: the teacher cache forward instead (dense experts, no backward), on
--rows rows per step (config.cache.rows_per_chunk, one chunk per step).

Prints per mesh (the rows of XLA's automatic partitioning without expert parallelism, the "off"
rows of docs/real_models.md, were measured at the commit that added expert parallelism): FLOPs per device and their ratio
to (one device's FLOPs / 8), bytes per device, collective operand bytes per device for the step
and per layer, and per layer the bytes each device receives (plan.collective_traffic: an
all-gather's operand is one shard, so operand bytes undercount it g-1 times), by kind. Per
layer = (step at L layers - step at L/2 layers) / (L/2): what each decoder layer adds, without
the embedding, the lm_head and the loss.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESHES = {"one device": (1, 1, 1, 1), "data=8": (8, 1, 1, 1), "fsdp=8": (1, 8, 1, 1),
          "expert=8": (1, 1, 8, 1), "data=2,expert=4": (2, 1, 4, 1)}
GiB = 2**30


def teacher_dir(layers: int, root: pathlib.Path) -> pathlib.Path:
  sys.path.insert(0, str(ROOT))
  from moedistill.model.config import qwen3_30b_a3b
  import dataclasses
  d = root / f"q30_{layers}l"
  d.mkdir(exist_ok=True)
  cfg = dataclasses.replace(qwen3_30b_a3b(), num_hidden_layers=layers)
  (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  return d


def plan(teacher, shape, args, ep: bool) -> dict:
  n = 1
  for s in shape:
    n *= s
  cmd = [sys.executable, "-m", "moedistill.plan", "--config=configs/two_stage.py:qwen3_30b_a3b",
         f"--config.teacher={teacher}", f"--programs={args.program}", f"--devices={n}",
         f"--config.cache.rows_per_chunk={args.rows}", "--config.cache.chunks_per_step=1",
         "--config.model.scan_layers=False", "--config.train.micro_batches=1",
         f"--config.train.batch_size={args.rows}", f"--config.data.seq_len={args.seq}",
         "--config.stage_order=all", f"--config.model.moe_backend={args.backend}",
         "--device_memory=1TiB",  # figures, not a fit: one device holds the whole model
         f"--config.model.ep_capacity_factor={args.ep_capacity_factor}",
         *(f"--config.mesh.{a}={s}" for a, s in zip(("data", "fsdp", "expert", "tensor"), shape))]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"plan failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
  name = "train_all" if args.program == "train" else args.program
  return json.loads(r.stdout.strip().splitlines()[-1])["programs"][name]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--backend", default="capacity", choices=("capacity", "sorted", "ragged"))
  ap.add_argument("--ep_capacity_factor", type=float, default=0.0)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4, help="even; per layer = difference to half")
  ap.add_argument("--meshes", default="data=8,fsdp=8,expert=8")
  ap.add_argument("--program", default="train", choices=("train", "cache_forward"))
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    full, half = (teacher_dir(n, pathlib.Path(tmp)) for n in (args.layers, args.layers // 2))
    what = "train step (stage all)" if args.program == "train" else args.program
    print(f"{what}, Qwen3-30B-A3B widths, {args.layers} layers unscanned, "
          f"{args.rows}x{args.seq} tokens, bf16 compute, backend {args.backend}, "
          f"ep_capacity_factor {args.ep_capacity_factor}", flush=True)
    one = plan(full, MESHES["one device"], args, True)
    ideal = one["flops_per_device"] / 8
    print(f"one device: {one['flops_per_device']:.4e} FLOP, /8 = {ideal:.4e}", flush=True)
    print(f"{'mesh':16} {'EP':3} {'FLOP/dev':>10} {'x ideal':>7} {'GiB/dev':>8} "
          f"{'operand GiB/step':>16} {'/layer':>7} {'received GiB/layer':>18}  by kind")
    for name in args.meshes.split(","):
      for ep in (True,):
        a, b = plan(full, MESHES[name], args, ep), plan(half, MESHES[name], args, ep)
        per = lambda key: (a[key] - b[key]) / (args.layers - args.layers // 2)  # noqa: E731
        kinds = {k: (a["collective_traffic_per_device"][k] - b["collective_traffic_per_device"][k])
                 / (args.layers - args.layers // 2) for k in a["collective_traffic_per_device"]}
        print(f"{name:16} {'on' if ep else 'off':3} {a['flops_per_device']:10.4e} "
              f"{a['flops_per_device'] / ideal:7.3f} {a['bytes_per_device'] / GiB:8.2f} "
              f"{a['collective_bytes_per_device'] / GiB:16.3f} "
              f"{per('collective_bytes_per_device') / GiB:7.3f} {sum(kinds.values()) / GiB:18.3f}"
              "  " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in kinds.items() if v), flush=True)


if __name__ == "__main__":
  main()
