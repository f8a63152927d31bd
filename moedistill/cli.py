"""Shared CLI plumbing: --config (ml_collections file, lock_config=True), overrides
(--config.a.b=v), multi-host start-up, and one-line errors for bad input.

Multi-host: pass --coordinator=HOST:PORT --num_processes=N --process_id=I to every process
(on TPU pods and SLURM, --coordinator=auto lets JAX discover them).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moedistill.errors import UserError

FLAGS = flags.FLAGS
_DEFINED = False
EXTRA = {
    "overwrite": lambda: flags.DEFINE_bool("overwrite", False, "replace existing outputs"),
    "split": lambda: flags.DEFINE_enum("split", "both", ["train", "eval", "both"],
                                       "which cache to build"),
}


def define_flags(extra=()):
  global _DEFINED
  if _DEFINED:
    return
  config_flags.DEFINE_config_file("config", None, "config file (path[:variant])",
                                  lock_config=True)
  flags.DEFINE_string("coordinator", "", "multi-host: HOST:PORT of process 0, or 'auto'")
  flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", 0, "multi-host: this process's index")
  for name in extra:
    EXTRA[name]()
  _DEFINED = True


def init_distributed():
  import jax
  if not FLAGS.coordinator:
    return
  # CPU processes need a collectives implementation (only the CPU client reads this).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.coordinator == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


def load_job(argv):
  from moedistill.config import job_from_config
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: use --flag=value")
  if FLAGS.config is None:
    raise UserError("--config is required, e.g. --config=configs/two_stage.py")
  init_distributed()
  return job_from_config(FLAGS.config), FLAGS


def run(main, extra_flags=()):
  """absl app.run with UserError -> one stderr line, exit status 2."""
  define_flags(extra_flags)

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # keep stderr for what the user must read
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)
  app.run(wrapped)
