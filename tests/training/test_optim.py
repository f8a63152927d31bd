"""Regex groups: first match wins, coverage and empty/invalid patterns are errors, per-group
LR multipliers give the expected update ratio, default weight-decay exclusions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.config import Group, Stage, TrainConfig
from moedistill.errors import ConfigError
from moedistill.training import optim

PATHS = ["embed_tokens.embedding", "layers.0.mlp.experts.shared_core.gate",
         "layers.0.mlp.experts.wrapper.gate_a", "layers.1.mlp.experts.wrapper.gate_a",
         "layers.0.input_layernorm.scale", "lm_head.kernel"]


def G(*groups):
  return tuple(Group(p, m, wd) for p, m, *rest in groups for wd in [rest[0] if rest else None])


def stage(groups, lr=1e-2):
  return Stage("s", 5, 0.0, groups, lr, 0.5, 1.0, 0)


def tconf(wd=0.1):
  return TrainConfig(4, 1, "bucket", 64, "constant", 0.1, wd, 0.0, 0.9, 0.99, 10, 2, 1, ())


def test_first_match_wins_and_seed_patterns():
  idx = optim.assign(PATHS, G((r"layers\.1\..*", 2.0), (".*wrapper.*", 1.0),
                              (".*shared_core.*", 0.0), (".*embed.*", 0.0), (".*", 0.5)))
  assert idx == [3, 2, 1, 0, 4, 4]


@pytest.mark.parametrize("groups,match", [
    (G((".*wrapper.*", 1.0)), "4 params match no pattern"),
    (G((".*", 1.0), (".*wrapper.*", 2.0)), "pattern '.*wrapper.*' matches no param"),
    (G((".*nothing_here.*", 1.0), (".*", 1.0)), "'.*nothing_here.*' matches no param"),
    (G(("(unclosed", 1.0), (".*", 1.0)), "invalid regex '(unclosed'"),
    (G((".*", -1.0)), "lr multiplier -1.0"),
])
def test_bad_groups(groups, match):
  with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("*", r"\*")
                     .replace(".", r"\.")):
    optim.assign(PATHS, groups)


def test_all_frozen_is_an_error():
  with pytest.raises(ConfigError, match="every param is frozen"):
    optim.build(stage(G((".*", 0.0))), tconf(), {p: (2,) for p in PATHS}, 5)


def test_per_group_lr_ratio_and_frozen_have_no_state():
  shapes = {p: (3, 2) for p in PATHS}
  groups = G((".*wrapper.*", 1.0), (".*shared_core.*", 0.25), (".*", 0.0))
  tx, trainable, rows = optim.build(stage(groups), tconf(wd=0.0), shapes, 5)
  assert sorted(trainable) == sorted(PATHS[1:4])
  params = {p: jnp.ones((3, 2)) for p in trainable}
  grads = {p: jnp.full((3, 2), 0.3) for p in trainable}
  state = tx.init(params)
  # mu and nu for the 3 trainable [3, 2] params only (frozen ones carry no state).
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * 3 * 6
  updates, _ = tx.update(grads, state, params)
  u = {p: float(jnp.abs(updates[p]).mean()) for p in trainable}
  np.testing.assert_allclose(u["layers.0.mlp.experts.shared_core.gate"] /
                             u["layers.0.mlp.experts.wrapper.gate_a"], 0.25, rtol=1e-6)
  np.testing.assert_allclose(u["layers.0.mlp.experts.wrapper.gate_a"], 1e-2, rtol=1e-3)
  assert [r[2] for r in rows] == [12, 6, 18]


def test_default_weight_decay_exclusions():
  assert optim.default_no_decay("layers.0.input_layernorm.scale")
  assert optim.default_no_decay("embed_tokens.embedding")
  assert optim.default_no_decay("layers.0.self_attn.q_proj.bias")
  assert not optim.default_no_decay("layers.0.self_attn.q_proj.kernel")
  g = Group(".*", 1.0, 0.5)
  assert optim.weight_decay_for("norm.scale", g, 0.1) == 0.5  # explicit group value wins


def test_schedule_warmup_then_cosine():
  st = Stage("s", 100, 0.0, G((".*", 1.0)), 1.0, 0.5, 1.0, 10)
  tc = TrainConfig(4, 1, "bucket", 64, "cosine", 0.1, 0.0, 0.0, 0.9, 0.99, 10, 2, 1, ())
  sched = optim.schedule(st, tc, 100)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(100)) - 0.1) < 1e-6
