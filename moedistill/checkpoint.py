"""Orbax checkpoints of the train state; the only module that imports orbax.

A checkpoint holds `state` (params dict, opt_state) and `meta` (JSON: stage index, step in
stage, global step, rng seed). Steps are global (monotonic across stages). Saves are
asynchronous; `restore_latest` falls back to the previous checkpoint, with a warning, when
the latest one cannot be read (e.g. truncated by a crash or a full disk).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from moedistill.errors import UserError


class Checkpoints:
  def __init__(self, directory, keep: int = 3, async_save: bool = True):
    self.dir = Path(directory).absolute()
    self.mngr = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, meta: dict, *, wait: bool = False):
    if step in self.mngr.all_steps():
      return
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
      self.mngr.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state):
    """abstract_state: a pytree of jax.ShapeDtypeStruct with shardings (the target layout)."""
    return self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def restore_latest(self, abstract_for):
    """(step, meta, state) of the newest readable checkpoint, or None. `abstract_for(meta)`
    gives the restore target (the optimizer state's layout depends on the stage)."""
    for step in reversed(self.steps()):
      try:
        meta = self.read_meta(step)
        return step, meta, self.restore(step, abstract_for(meta))
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 - any damage means: use an older checkpoint
        print(f"warning: checkpoint {self.dir / str(step)} is unreadable "
              f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); "
              "falling back to an older one", file=sys.stderr)
    return None

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def abstract_like(tree):
  """ShapeDtypeStructs with the arrays' shardings, as Orbax restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
