"""configs/two_stage.py on the real-vocabulary teacher of scripts/make_real_vocab_teacher.py:
its checkpoint, its train.jsonl for distillation and its heldout.jsonl for evaluation.

  python -m moedistill.train --config=configs/quality_per_byte.py:runs/real_vocab_teacher \
      --config.workdir=runs/qpb/top64 --config.cache.k=64

The part after ':' is the teacher script's --out directory (default runs/real_vocab_teacher).
benchmarks/quality_per_byte.py drives it.
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _two_stage():
  spec = importlib.util.spec_from_file_location("two_stage", ROOT / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config(arg: str = ""):
  src = Path(arg or ROOT / "runs" / "real_vocab_teacher")
  if not src.is_absolute():
    src = Path.cwd() / src
  c = _two_stage()
  c.workdir = "runs/qpb/default"
  c.teacher = str(src / "teacher")
  with c.unlocked():  # set here: list fields cannot be overridden on the command line
    c.data.train.source = (str(src / "train.jsonl"),)
    c.data.eval.source = (str(src / "heldout.jsonl"),)
    c.cache.temperatures = (1.0,)      # every stage runs at T=1; a sampled cache holds one T
  c.data.train.max_rows = 640          # 640 rows x 128 tokens: one pass at 2 x 40 steps x 8
  c.cache.k = 64
  c.student.rank = 8
  c.train.batch_size = 8
  c.train.log_every = 5
  c.stages.wrappers.steps = 40
  c.stages.all.steps = 40
  return c
