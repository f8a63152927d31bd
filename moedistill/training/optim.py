"""Regex parameter groups -> per-param labels -> optax.partition of AdamW transforms.

Groups are ordered (pattern, lr_multiplier, weight_decay); each dotted param path takes the
first group whose pattern fully matches. Every path must be covered and every pattern must
match something. Multiplier 0 freezes: frozen params get no gradient and no optimizer state
(the train step differentiates only the trainable dict). weight_decay None = the default:
config.train.weight_decay, except 0 for norm scales, biases and embeddings.
"""
from __future__ import annotations

import re

import numpy as np
import optax

from moedistill.config import Group, Stage, TrainConfig
from moedistill.errors import ConfigError


def compile_groups(groups: tuple[Group, ...], where: str):
  out = []
  for g in groups:
    try:
      out.append(re.compile(g.pattern))
    except re.error as e:
      raise ConfigError(f"{where}: invalid regex {g.pattern!r} ({e})") from None
    if g.lr_mult < 0:
      raise ConfigError(f"{where}: lr multiplier {g.lr_mult} for {g.pattern!r}: expected >= 0")
  return out


def assign(paths: list[str], groups: tuple[Group, ...], where: str = "groups") -> list[int]:
  """Group index for each path (first full match wins)."""
  regexes = compile_groups(groups, where)
  idx, uncovered = [], []
  for p in paths:
    hit = next((i for i, r in enumerate(regexes) if r.fullmatch(p)), None)
    if hit is None:
      uncovered.append(p)
    idx.append(hit)
  if uncovered:
    raise ConfigError(f"{where}: {len(uncovered)} params match no pattern, e.g. "
                      f"{uncovered[:5]}; add a catch-all like ('.*', 0.0)")
  empty = [g.pattern for i, g in enumerate(groups) if i not in idx]
  if empty:
    raise ConfigError(f"{where}: pattern {empty[0]!r} matches no param (or only params an "
                      "earlier pattern already took)")
  return idx


def default_no_decay(path: str) -> bool:
  leaf = path.rsplit(".", 1)[-1]
  return leaf in ("scale", "bias") or "embed" in path


def weight_decay_for(path: str, group: Group, default: float) -> float:
  if group.weight_decay is not None:
    return group.weight_decay
  return 0.0 if default_no_decay(path) else default


def schedule(stage: Stage, tc: TrainConfig, total_steps: int):
  warm = min(stage.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warm, 1)
  end = stage.lr * tc.min_lr_ratio
  if tc.schedule == "cosine":
    tail = optax.cosine_decay_schedule(stage.lr, decay_steps, alpha=tc.min_lr_ratio)
  elif tc.schedule == "linear":
    tail = optax.linear_schedule(stage.lr, end, decay_steps)
  else:
    tail = optax.constant_schedule(stage.lr)
  if not warm:
    return tail
  return optax.join_schedules([optax.linear_schedule(0.0, stage.lr, warm), tail], [warm])


def build(stage: Stage, tc: TrainConfig, shapes: dict[str, tuple], total_steps: int):
  """Returns (optimizer over the trainable dict, trainable paths, table rows)."""
  paths = list(shapes)
  where = f"config.stages.{stage.name}.groups"
  idx = assign(paths, stage.groups, where)
  labels, transforms = {}, {}
  sched = schedule(stage, tc, total_steps)
  for p, gi in zip(paths, idx):
    g = stage.groups[gi]
    if g.lr_mult == 0:
      continue
    wd = weight_decay_for(p, g, tc.weight_decay)
    label = f"g{gi}_wd{wd}"
    labels[p] = label
    if label not in transforms:
      transforms[label] = optax.adamw(lambda s, m=g.lr_mult: sched(s) * m, b1=tc.b1, b2=tc.b2,
                                      weight_decay=wd)
  if not labels:
    raise ConfigError(f"{where}: every param is frozen (all multipliers 0); nothing to train")
  parts = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
  tx = optax.chain(*parts, optax.partition(transforms, labels))
  rows = []
  for gi, g in enumerate(stage.groups):
    n = sum(int(np.prod(shapes[p])) for p, i in zip(paths, idx) if i == gi)
    rows.append((gi, g.pattern, n, stage.lr * g.lr_mult))
  return tx, [p for p in paths if p in labels], rows


def format_table(stage: Stage, rows) -> str:
  lines = [f"stage {stage.name}: {stage.steps} steps, alpha={stage.alpha}, "
           f"T={stage.temperature}",
           f"  {'group':>5}  {'pattern':<32} {'params':>14}  {'peak lr':>9}"]
  for gi, pat, n, lr in rows:
    lines.append(f"  {gi:>5}  {pat:<32} {n:>14,}  {'frozen' if lr == 0 else f'{lr:.2e}':>9}")
  return "\n".join(lines)
