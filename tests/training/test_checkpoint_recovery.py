"""Checkpoints on small pytrees, in process: a layout other than the target is refused with one
line before anything is read or deleted; real damage falls back with a warning and the step
saved again replaces the damaged one, after which restore is silent; restart_from's
params-only restore. (End-to-end runs of the same paths: test_train.py, test_multihost.py.)"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moedistill.errors import UserError
from moedistill.training.checkpoint import Checkpoints, abstract_like, restore_params


def state_of(params, trainable=("w",)):
  """Adam on the `trainable` params only: the optimizer layout follows the param groups."""
  labels = {k: "t" if k in trainable else "f" for k in params}
  tx = optax.partition({"t": optax.adam(1e-2), "f": optax.set_to_zero()}, labels)
  return {"params": params, "opt_state": tx.init(params)}


def params_of(seed=0, rank=3):
  r = np.random.RandomState(seed)
  return {"w": jnp.asarray(r.randn(4, rank), jnp.float32),
          "layers.0.scale": jnp.asarray(r.randn(4), jnp.float32)}


def listing(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
  """Checkpoints at steps 1 and 2, each with its own values."""
  ck = Checkpoints(tmp_path / "ck", async_save=False)
  states = {s: state_of(params_of(seed=s)) for s in (1, 2)}
  for s, st in states.items():
    ck.save(s, st, {"stage": 0, "step_in_stage": s})
  ck.close()
  return tmp_path / "ck", states


def restore(path, target_state, capsys):
  ck = Checkpoints(path, async_save=False)
  try:
    got = ck.restore_latest(lambda step, meta: abstract_like(target_state))
    return ck, got, capsys.readouterr().err
  finally:
    ck.close()


@pytest.mark.parametrize("change, expected", [
    (lambda: state_of(params_of(), trainable=("w", "layers.0.scale")),  # other param groups
     "it holds 5 arrays where the config expects 7; it lacks "
     "opt_state.inner_states.t.inner_state.0.mu.layers.0.scale"),
    (lambda: state_of(params_of(rank=5)),  # other ranks
     "params.w is float32[4, 3] there, the config expects float32[4, 5]"),
])
def test_other_layout_is_refused_and_nothing_changes(saved, capsys, change, expected):
  path, _ = saved
  before = listing(path)
  with pytest.raises(UserError) as e:
    restore(path, change(), capsys)
  msg = str(e.value)
  assert "\n" not in msg and expected in msg, msg
  assert f"checkpoint {path / '2'} does not match the config" in msg
  assert f"--config.train.restart_from={path / '2'}" in msg
  assert "unreadable" not in capsys.readouterr().err  # not mistaken for damage
  assert listing(path) == before


def damage(step_dir):
  """Truncate the array data but not the tree metadata (_METADATA), so the layout check
  passes and only reading the arrays fails."""
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.name != "_METADATA":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a crash mid-write


def same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_damage_falls_back_then_the_resaved_step_replaces_it(saved, capsys):
  path, states = saved
  damage(path / "2")
  ck, got, err = restore(path, states[2], capsys)
  assert got[0] == 1 and same(got[2], states[1])
  assert f"checkpoint {path / '2'} is unreadable" in err and ck.damaged == {2}
  # The run retrains step 2 and saves it: the damaged step is replaced, not skipped.
  ck = Checkpoints(path, async_save=False)
  ck.restore_latest(lambda step, meta: abstract_like(states[2]))
  capsys.readouterr()
  ck.save(2, states[2], {"stage": 0, "step_in_stage": 2})
  ck.close()
  _, got, err = restore(path, states[2], capsys)
  assert got[0] == 2 and same(got[2], states[2]) and got[1]["step_in_stage"] == 2
  assert err == ""


def test_unreadable_metadata_is_damage_not_a_layout_change(saved, capsys):
  path, states = saved
  (path / "2" / "state" / "_METADATA").write_text("{")
  _, got, err = restore(path, states[2], capsys)
  assert got[0] == 1 and "is unreadable" in err


def test_restart_from_restores_params_only(saved):
  path, states = saved
  target = abstract_like(params_of(seed=9))
  got = restore_params(path / "2", target)
  assert same(got, states[2]["params"]) and got.keys() == target.keys()
  with pytest.raises(UserError, match=r"restart_from=.*: its params do not match the config "
                     r"\(params.w is float32\[4, 3\] there, the config expects float32\[4, 5\]\)"):
    restore_params(path / "2", abstract_like(params_of(rank=5)))
  with pytest.raises(UserError, match="no checkpoint there"):
    restore_params(path / "7", target)
