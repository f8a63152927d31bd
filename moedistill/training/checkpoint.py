"""Orbax checkpoints of the train state; the only module that imports orbax.

A checkpoint holds `state` (params dict, opt_state) and `meta` (JSON: stage index, step in
stage, global step, rng seed). Steps are global (monotonic across stages). Saves are
asynchronous.

Restoring tells a changed config from damage by the checkpoint's stored tree metadata
(paths, shapes, dtypes), read before any array:
- a layout other than the config's restore target (other param groups, ranks, stages) is a
  UserError naming the difference; nothing is deleted;
- unreadable files (truncated, missing, garbage: a checksum or decode failure) are damage: a
  warning, a fall back to the previous checkpoint, and the retrained step replaces the damaged
  one when it is saved;
- any other failure (out of memory, permissions, a transient I/O error) is not damage: the
  run stops with it (`CheckpointReadError`, one line) and nothing is deleted.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from moedistill.errors import UserError, reason


def _handlers():
  # Named handlers let Orbax read an item's metadata without restoring it first.
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpoints:
  def __init__(self, directory, keep: int = 3, async_save: bool = True):
    self.dir = Path(directory).absolute()
    self.mngr = ocp.CheckpointManager(
        self.dir, item_handlers=_handlers(), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))
    self.damaged: set[int] = set()  # steps found unreadable by restore_latest

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, meta: dict, *, wait: bool = False):
    if step in self.damaged:  # the retrained step replaces the unreadable one
      self.mngr.delete(step)
      self.damaged.discard(step)
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
      self.mngr.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def stored_layout(self, step: int) -> dict:
    md = self.mngr.item_metadata(step)["state"]
    if md is None:
      raise ValueError("no tree metadata")
    return flat_layout(md.tree)

  def restore(self, step: int, abstract_state):
    """abstract_state: a pytree of jax.ShapeDtypeStruct with shardings (the target layout)."""
    return self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def mismatch(self, step: int, what: str) -> UserError:
    path = self.dir / str(step)
    return UserError(
        f"checkpoint {path} does not match the config ({what}): it was written with other "
        "param groups, ranks or stages; run in a new workdir (--config.workdir=...), adding "
        f"--config.train.restart_from={path} to start from its params")

  def restore_latest(self, target_for):
    """(step, meta, state) of the newest readable checkpoint, or None.

    `target_for(step, meta)` gives the restore target (the optimizer state's layout depends on
    the stage) or raises a UserError when meta does not fit the config."""
    for step in reversed(self.steps()):
      try:
        meta, stored = self.read_meta(step), self.stored_layout(step)
      except Exception as e:  # noqa: BLE001 - sorted by is_damage
        self._damaged_or_stop(step, e)
        continue
      target = target_for(step, meta)
      diff = layout_diff(stored, flat_layout(target))
      if diff:
        raise self.mismatch(step, diff)
      try:
        return step, meta, self.restore(step, target)
      except Exception as e:  # noqa: BLE001 - sorted by is_damage
        self._damaged_or_stop(step, e)
    return None

  def _damaged_or_stop(self, step: int, e: BaseException):
    """Proven damage falls back (and is replaced when retrained); any other failure (out of
    memory, permissions, a transient I/O error) stops the run and deletes nothing."""
    if not is_damage(e):
      self.damaged.clear()  # nothing is replaced on the strength of this run
      raise CheckpointReadError(
          f"checkpoint {self.dir / str(step)} could not be read ({_one_line(e)}); this is "
          "not damage, so nothing was deleted and no older checkpoint was used: fix the "
          "cause and rerun the same command") from e
    self._warn_damaged(step, e)

  def _warn_damaged(self, step: int, e: Exception):
    self.damaged.add(step)
    print(f"warning: checkpoint {self.dir / str(step)} is unreadable ({_one_line(e)}); "
          "falling back to an older one", file=sys.stderr)

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


class CheckpointReadError(UserError):
  """A checkpoint could not be read for a reason other than damage (see is_damage)."""


# TensorStore status codes of a read that proves the files are damaged or missing; the others
# (RESOURCE_EXHAUSTED, PERMISSION_DENIED, UNAVAILABLE, DEADLINE_EXCEEDED, ...) say nothing
# about the files.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_STATUS = re.compile(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|"
                     r"ALREADY_EXISTS|PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|"
                     r"ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|"
                     r"UNAUTHENTICATED): ")


def is_damage(e: BaseException) -> bool:
  """True for proven damage: missing files, a checksum or decode failure. Out of memory,
  permission and transient I/O errors are not."""
  if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError)):
    return True
  if isinstance(e, (MemoryError, PermissionError)) or not isinstance(e, ValueError):
    return False  # RuntimeError (XLA's RESOURCE_EXHAUSTED), OSError, ...
  code = _STATUS.search(str(e))
  return code is None or code.group(1) in _DAMAGE_CODES  # a plain ValueError: a decode error


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {reason(e) if str(e) else ''}"


def restore_params(step_dir, abstract_params) -> dict:
  """The params of a checkpoint step directory (another run's), without its optimizer
  state; the layout is checked against `abstract_params` first."""
  path = Path(step_dir).absolute() / "state"
  field = f"config.train.restart_from={step_dir}"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    stored = flat_layout(handler.metadata(path).tree)
  except FileNotFoundError as e:
    raise UserError(f"{field}: no checkpoint there (expected <workdir>/checkpoints/<step>)"
                    ) from e
  diff = layout_diff({k: v for k, v in stored.items() if k[0] == "params"},
                     flat_layout({"params": abstract_params}))
  if diff:
    raise UserError(f"{field}: its params do not match the config ({diff})")
  target = {"params": abstract_params}
  with ocp.Checkpointer(handler) as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))["params"]


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flat_layout(tree) -> dict:
  """{path tuple: (shape, dtype name)} of a tree of arrays, ShapeDtypeStructs or Orbax
  ArrayMetadata. Orbax stores named tuples as lists and empty nodes as None, so paths use
  plain names and indices on both sides."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(e) for e in path): (tuple(x.shape), jax.numpy.dtype(x.dtype).name)
          for path, x in leaves}


def _params_first(keys):
  # A param's difference names the cause better than the same difference in its moments.
  return sorted(keys, key=lambda k: (k[0] != "params", k))


def layout_diff(stored: dict, want: dict) -> str | None:
  """The first difference between two flat layouts, in words; None when equal."""
  name = ".".join
  missing = _params_first(want.keys() - stored.keys())
  extra = _params_first(stored.keys() - want.keys())
  if missing or extra:
    first = (f"lacks {name(missing[0])}" if missing else f"has an extra {name(extra[0])}")
    return f"it holds {len(stored)} arrays where the config expects {len(want)}; it {first}"
  for k in _params_first(want):
    if stored[k] != want[k]:
      return (f"{name(k)} is {stored[k][1]}{list(stored[k][0])} there, the config expects "
              f"{want[k][1]}{list(want[k][0])}")
  return None


def abstract_like(tree):
  """ShapeDtypeStructs with the arrays' shardings, as Orbax restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
