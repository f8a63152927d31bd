"""Params as a flat {dotted path: array} dict (what optax, Orbax and regex groups see), and
the CLI that prints every path with its group per stage, without loading weights.

CLI: python -m moedistill.params --config=configs/two_stage.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from moedistill.model.config import ModelConfig
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import Compression


def dotted(path) -> str:
  return ".".join(str(p) for p in path)


def split(model):
  """(graphdef, template, params): template keeps the Variables' metadata for merge."""
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  template = [(p, v) for p, v in flat]
  params = {dotted(p): v.get_value() for p, v in flat if isinstance(v, nnx.Param)}
  return graphdef, template, params


def merge(graphdef, template, params):
  flat = [(p, v.replace(params[dotted(p)]) if isinstance(v, nnx.Param) else v)
          for p, v in template]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def logical_axes(template) -> dict[str, tuple]:
  return {dotted(p): v.get_metadata().get("logical_axes") for p, v in template
          if isinstance(v, nnx.Param)}


def abstract_student(cfg: ModelConfig, comp: Compression, rt: Runtime = Runtime()):
  return nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt,
                                                    compression=comp))


def shapes(model) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in split(model)[2].items()}


def main(argv):
  from moedistill import optim
  from moedistill.cli import load_job
  job, _ = load_job(argv)
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  student = abstract_student(cfg, Compression(*job.ranks))
  sh = shapes(student)
  for stage in job.train.stages:
    idx = optim.assign(list(sh), stage.groups, f"config.stages.{stage.name}.groups")
    print(f"# stage {stage.name}")
    for (p, s), gi in zip(sh.items(), idx):
      g = stage.groups[gi]
      state = "frozen" if g.lr_mult == 0 else f"lr x{g.lr_mult:g}"
      print(f"{p:<56} {str(list(s)):<18} group {gi} ({g.pattern}) {state}")
  n = sum(int(np.prod(s)) for s in sh.values())
  print(f"# {len(sh)} params, {n:,} elements")


if __name__ == "__main__":
  from moedistill.cli import run
  run(main)
