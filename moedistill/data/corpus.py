"""A deterministic synthetic corpus with structure a small model can learn and a compressed
student can visibly lose: a fixed world of facts (memorisation), two-number arithmetic
(computation), bracket matching (a stack), and a small grammar (syntax).

`documents(n, seed)` is a pure function of its arguments; the world itself is fixed by
WORLD_SEED, so train and held-out documents state the same facts.
"""
from __future__ import annotations

import numpy as np

WORLD_SEED = 1234
NAMES = ("alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy "
         "rupert sybil trent ursula victor wendy").split()
CITIES = "paris tokyo lima cairo oslo delhi quito rome".split()
COLORS = "red blue green black white yellow".split()
PETS = "cat dog bird fish horse".split()
ADJ = "small big old young happy quiet".split()
NOUNS = "dog bird child farmer teacher river tree".split()
VERBS = "sees likes follows helps finds".split()
BRACKETS = ("()", "[]", "{}")


def world():
  r = np.random.default_rng(WORLD_SEED)
  return {n: (CITIES[r.integers(len(CITIES))], COLORS[r.integers(len(COLORS))],
              PETS[r.integers(len(PETS))]) for n in NAMES}


def _facts(r, w):
  lines = []
  for n in r.choice(NAMES, 3, replace=False):
    city, color, pet = w[n]
    lines.append(r.choice([f"{n} lives in {city} .", f"{n} has a {color} {pet} .",
                           f"the {pet} of {n} is {color} .", f"{n} is from {city} ."]))
  return " ".join(lines)


def _arith(r):
  out = []
  for _ in range(3):
    a, b = int(r.integers(0, 30)), int(r.integers(0, 30))
    out.append(f"{a} + {b} = {a + b} ." if r.random() < 0.6 else
               f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)} .")
  return " ".join(out)


def _brackets(r, depth=0):
  out = []
  for _ in range(int(r.integers(1, 3))):
    o, c = BRACKETS[r.integers(3)]
    inner = _brackets(r, depth + 1) if depth < 3 and r.random() < 0.6 else ""
    out.append(f"{o} {inner} {c}" if inner else f"{o} {c}")
  return " ".join(out)


def _sentence(r):
  def np_():
    return f"the {r.choice(ADJ)} {r.choice(NOUNS)}" if r.random() < 0.5 else \
        f"the {r.choice(NOUNS)}"
  return f"{np_()} {r.choice(VERBS)} {np_()} ."


def documents(n: int, seed: int) -> list[str]:
  r = np.random.default_rng(seed)
  w = world()
  kinds = (lambda: _facts(r, w), lambda: _arith(r), lambda: "brackets : " + _brackets(r),
           lambda: " ".join(_sentence(r) for _ in range(2)))
  return [kinds[r.integers(len(kinds))]() for _ in range(n)]
