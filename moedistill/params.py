"""Print every param path of the student with its shape and its group per stage, without
loading weights (only the teacher's config.json is read).

CLI: python -m moedistill.params --config=configs/two_stage.py [--config.<field>=<value>]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from moedistill.model.config import ModelConfig
from moedistill.model.shared_core import Compression
from moedistill.training import optim, param_tree


def main(argv):
  from moedistill.cli import load_job
  job, _ = load_job(argv)
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  sh = param_tree.shapes(param_tree.abstract_student(cfg, Compression(*job.ranks)))
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
