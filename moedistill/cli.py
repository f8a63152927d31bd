"""The one flag/config/error stack of every command (`python -m moedistill.<command>`).

Each command calls `run(main, extra_flags=...)` and gets:
- `--config=FILE[:variant]` (an ml_collections `get_config` file, lock_config=True) and
  overrides of any field, `--config.a.b=value`, lists included: `--config.cache.temperatures=1,2`,
  `--config.data.train.source=/a.jsonl,/b.jsonl`, `--config.stages.all.groups='[(".*", 1.0)]'`
  (values parsed with `ast.literal_eval`; bare words stay strings);
- the multi-host flags: --coordinator=HOST:PORT --num_processes=N --process_id=I on every
  process (on TPU pods and SLURM, --coordinator=auto lets JAX discover them);
- one error path: bad flags, bad overrides and `UserError` print one `error: ...` line on
  stderr and exit with status 2 (no traceback);
- `--help` (`-h`, `-?`, `--helpshort`): the command's docstring and its own flags, `--config`
  included, on stdout, exit 0 (`--helpfull`: every module's flags);
- a closed stdout (`... | head`) ends the command quietly with status 141 (128 + SIGPIPE, what
  `cat` gives); Ctrl-C prints `interrupted: rerun the same command to resume`, status 130.
"""
from __future__ import annotations

import ast
import os
import signal
import sys

# Before anything imports transformers: its import-time advice ("PyTorch was not found...")
# and load-time warnings would print ahead of a refusal's one `error:` line. A user's own
# setting wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging
from ml_collections import config_flags

from moedistill.errors import UserError

FLAGS = flags.FLAGS
# Flags that several commands take, defined by name so each reads the same everywhere.
SHARED = {
    "overwrite": lambda: flags.DEFINE_bool("overwrite", False, "replace existing outputs"),
    "split": lambda: flags.DEFINE_enum("split", "both", ["train", "eval", "both"],
                                       "which cache to build"),
    "phase": lambda: flags.DEFINE_enum("phase", "all", ["tokens", "logits", "all"],
                                       "cache phase: tokenize+pack, teacher logits, or both"),
    "verify": lambda: flags.DEFINE_bool("verify", False, "re-hash every data file instead of "
                                        "trusting unchanged size and mtime"),
}


class ListParser(flags.ArgumentParser):
  """Overrides of list-typed config fields (config_flags has no parser for `list`).

  `[1, 2]`, `(1, 2)` and `1,2` give [1, 2]; `/a.jsonl,/b.jsonl` (not a Python literal)
  gives ['/a.jsonl', '/b.jsonl']; one value gives a list of one; '' and `[]` give [].
  Element types are checked where the config becomes a Job (`moedistill.config`)."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      return list(argument)
    text = argument.strip()
    if not text:
      return []
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return [_literal_or_word(part.strip()) for part in text.split(",") if part.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]

  def flag_type(self):
    return "list"


def _literal_or_word(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


config_flags.register_flag_parser_for_type(list, ListParser())


def define_flags(extra=()):
  """--config, the multi-host flags and a command's own: names from SHARED or callables that
  define absl flags."""
  before = set(FLAGS)
  config_flags.DEFINE_config_file(
      "config", None, "config file, path[:variant] (e.g. configs/two_stage.py); override any "
      "field with --config.<field>=<value>", lock_config=True)
  flags.DEFINE_string("coordinator", "", "multi-host: HOST:PORT of process 0, or 'auto'")
  flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", 0, "multi-host: this process's index")
  for f in extra:
    SHARED[f]() if isinstance(f, str) else f()
  # absl's --help lists the key flags of the main module (the command's file, sys.argv[0]);
  # the ones defined here or in SHARED belong to cli.py, so they are declared key flags of
  # the command too.
  for name in sorted(set(FLAGS) - before):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


HELP = {"--help": True, "-help": True, "-h": True, "--h": True, "-?": True, "--helpshort": True,
        "-helpshort": True, "--helpfull": False, "-helpfull": False}


def _help(argv):
  """--help and friends before absl's own (which exit 1): usage on stdout, exit 0."""
  for a in argv[1:]:
    if a == "--":
      return
    if a in HELP:
      try:
        app.usage(shorthelp=HELP[a], writeto_stdout=True)
        if HELP[a]:
          print("\nTry --helpfull to get a list of all flags.")
        sys.stdout.flush()
      except BrokenPipeError:
        _closed_stdout()
      sys.exit(0)


def _close_progress_bars():
  """A progress bar the failing work left open would share the error's line (on a terminal:
  `tokenizing ...:  0%|  | 0/3 [00:00<?, ?piece/s]error: ...`): each still-open bar is
  erased (leave=False) before the line is printed."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    bar.leave = False
    bar.close()


def fail(message: str):
  _close_progress_bars()
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _closed_stdout():
  """The reader of stdout went away (`| head`): nothing more can be shown, so end quietly.
  stdout is pointed at /dev/null first: the interpreter flushes it once more at exit, and a
  failed flush there would print 'Exception ignored ... BrokenPipeError'."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.close(devnull)
  sys.exit(128 + signal.SIGPIPE)


def _one_line(text: str) -> str:
  """absl/ml_collections errors can span lines (a config file's traceback): keep the first
  line (which flag) and the last (what went wrong)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _unknown_field(argv) -> str:
  """Which --config.a.b override names no field (ml_collections raises a bare KeyError)."""
  from ml_collections import ConfigDict
  args = dict(a.lstrip("-").split("=", 1) for a in argv[1:] if a.startswith("--config")
              and "=" in a)
  if "config" not in args:
    return "a --config.<field> override names no field of the config"
  config = FLAGS["config"].parser.parse(args["config"])
  for name in args:
    node, where = config, "config"
    for part in name.split(".")[1:]:
      if not isinstance(node, ConfigDict) or part not in node:
        have = sorted(node.keys()) if isinstance(node, ConfigDict) else "none: not a section"
        return f"--{name}: {where} has no field {part!r} (fields: {have})"
      node, where = node[part], f"{where}.{part}"
  return "a --config.<field> override names no field of the config"


def parse_flags(argv):
  """absl's flag parsing, with every refusal as one line and exit status 2."""
  _help(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(_one_line(e))
  except (KeyError, AttributeError):  # ml_collections: an override naming no field
    fail(_unknown_field(argv))


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


def load_job(argv=None, required: bool = True):
  """(Job or None, FLAGS): the validated job of --config (None when it is optional and not
  given), after starting multi-host JAX."""
  from moedistill.config import job_from_config
  del argv  # positional arguments are refused in run()
  config = FLAGS.config
  try:
    if config is not None:
      config.keys()  # config_flags defers a file that failed to load until first use
  except OSError as e:
    raise UserError(f"--config: {str(e).strip().splitlines()[-1].strip()}") from None
  if config is None and required:
    raise UserError("--config is required, e.g. --config=configs/two_stage.py")
  init_distributed()
  job = None if config is None else job_from_config(config)
  if job is not None:
    _FRESH[:] = [p for p in (job.workdir, job.cache.path) if _local(p) and not os.path.exists(p)]
  return job, FLAGS


# The job's local output roots (workdir, cache.path) that did not exist when it was loaded.
_FRESH: list[str] = []


def _local(path: str) -> bool:
  return "://" not in path and not path.lstrip().startswith("{")


def _left_behind() -> str:
  """After a refusal: remove the empty directories a first start made under the roots that
  did not exist before it (only empty ones, so nothing is deleted but what this run created
  and left empty: no file is ever removed), and name what is left, if anything."""
  left = []
  for root in _FRESH:
    if not os.path.isdir(root):
      continue
    for d, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):  # deepest first
      try:
        os.rmdir(d)
      except OSError:  # not empty
        pass
    if os.path.exists(root) and not any(root.startswith(p.rstrip("/") + "/") for p in left):
      left.append(root)
  return f" (this first start left {', '.join(left)} behind: delete it to start over)" if left \
      else ""


def pick(value, flag: str, from_job):
  """A flag's value, else what the config says (`from_job`: a value or None)."""
  if value is not None:
    return value
  if from_job is None:
    raise UserError(f"--{flag} is required (or pass --config=FILE to take it from the config)")
  return from_job


def run(main, extra_flags=()):
  """absl app.run of `main(argv)` with the shared flags and the one error path."""
  define_flags(extra_flags)

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # keep stderr for what the user must read
    try:
      if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: use --flag=value")
      main(argv)
      sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
    except UserError as e:
      fail(str(e) + _left_behind())
    except BrokenPipeError:
      _closed_stdout()
    except KeyboardInterrupt:
      _close_progress_bars()
      print("interrupted: rerun the same command to resume", file=sys.stderr)
      sys.exit(130)
  app.run(wrapped, flags_parser=parse_flags)
