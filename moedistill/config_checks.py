"""Checks of single config values, each refusing with one line that names the field and
what was expected, and the model section's: `runtime(config.model)` builds the model's
Runtime field by field (a field without its own checker is checked against its default's
type; a field the config leaves out takes the Runtime default)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from moedistill.errors import ConfigError
from moedistill.model import attention, resolve
from moedistill.model.layers import REMAT_POLICIES, Runtime
from moedistill.model.moe import BACKENDS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def _choice(value, choices, field):
  _check(value in choices, f"config.{field}={value!r}: expected one of {list(choices)}")
  return value


def _dtype(name, field):
  """`auto` (compute dtype): bfloat16 on accelerators, float32 on CPU (where bf16 is emulated
  and slower)."""
  if name == "auto":
    return jnp.float32 if resolve.target().platform == "cpu" else jnp.bfloat16
  _check(name in DTYPES, f"config.{field}={name!r}: expected one of {sorted(DTYPES)} or 'auto'")
  return DTYPES[name]


def _positive(value, field):
  _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
         f"config.{field}={value!r}: expected a positive integer")
  return value


def _lanes(value):
  _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
         f"config.cache.read_lanes={value!r}: expected 0 (the process count) or a positive "
         "integer")
  return value


def _bool(value, field):
  _check(isinstance(value, bool), f"config.{field}={value!r}: expected True or False")
  return value


def _attention(value):
  # cuDNN attention cannot even be lowered elsewhere: refuse before any weights are loaded.
  return _runnable(_choice(value, attention.IMPLS, "model.attention"), "attention")


def _runnable(value, field):
  """value, when the target device (resolve.target(): this host, or the one `plan
  --platform` lowers for) can run model.<field>=value; else one line naming the field."""
  t = resolve.target()
  why = resolve.unsupported(field, value, t.platform, t.device_kind)
  if why is not None:
    choices = ("auto", *BACKENDS) if field == "moe_backend" else attention.IMPLS
    ok = [c for c in choices if resolve.unsupported(field, c, t.platform, t.device_kind) is None]
    raise ConfigError(f"config.model.{field}={value!r}: {why}; expected one of {ok}")
  return value


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _ep_capacity_factor(value) -> float:
  _check(_number(value), f"config.model.ep_capacity_factor={value!r}: expected a number")
  f = float(value)
  _check(f == 0 or f >= 1, f"config.model.ep_capacity_factor={f}: expected 0 (dropless) or "
         ">= 1 (buffers of that many even shares; below 1 copies drop even when routing is even)")
  return f


# One checker per Runtime field that needs more than its type; a field without one is checked
# against its default's type. A config without the field gets the Runtime default.
_RUNTIME_CHECKS = {
    "dtype": lambda v: _dtype(v, "model.dtype"),
    "param_dtype": lambda v: _dtype(v, "model.param_dtype"),
    "moe_backend": lambda v: _runnable(_choice(v, ("auto", *BACKENDS), "model.moe_backend"),
                                       "moe_backend"),
    "remat": lambda v: _choice(v, REMAT_POLICIES, "model.remat"),
    "attention": lambda v: _attention(v),
    "attention_block": lambda v: _positive(v, "model.attention_block"),
    "ep_capacity_factor": lambda v: _ep_capacity_factor(v),
}


def _typed(value, default, field):
  if isinstance(default, bool):
    return _bool(value, field)
  if isinstance(default, float):
    _check(_number(value), f"config.{field}={value!r}: expected a number")
    return float(value)
  if isinstance(default, int):
    return _positive(value, field)
  _check(isinstance(value, type(default)), f"config.{field}={value!r}: expected a "
         f"{type(default).__name__}")
  return value


def runtime(m) -> Runtime:
  values = {}
  for f in dataclasses.fields(Runtime):
    if f.name in m:
      check = _RUNTIME_CHECKS.get(f.name)
      values[f.name] = check(m[f.name]) if check else _typed(m[f.name], f.default,
                                                             f"model.{f.name}")
  unknown = sorted(set(m.keys()) - {f.name for f in dataclasses.fields(Runtime)})
  _check(not unknown, f"config.model.{unknown[0] if unknown else ''}: unknown field; expected "
         f"one of {[f.name for f in dataclasses.fields(Runtime)]}")
  return Runtime(**values)
