"""Params as a flat {dotted path: array} dict: what optax, Orbax and regex groups see.

`split` / `merge` go between an NNX model and (graphdef, template, params); the template
keeps each Variable's metadata (logical axes) so `merge` rebuilds the same module.
"""
from __future__ import annotations

from flax import nnx

from moedistill.model.config import ModelConfig
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import Compression


def dotted(path) -> str:
  return ".".join(str(p) for p in path)


def split(model):
  """(graphdef, template, params): template keeps the Variables' metadata for merge."""
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  template = [(p, v) for p, v in flat]
  params = {dotted(p): v.get_value() for p, v in flat if isinstance(v, nnx.Param)}
  return graphdef, template, params


def merge(graphdef, template, params):
  flat = [(p, v.replace(params[dotted(p)]) if isinstance(v, nnx.Param) else v)
          for p, v in template]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def logical_axes(template) -> dict[str, tuple]:
  return {dotted(p): v.get_metadata().get("logical_axes") for p, v in template
          if isinstance(v, nnx.Param)}


def abstract_student(cfg: ModelConfig, comp: Compression, rt: Runtime = Runtime()):
  """The student's structure with abstract arrays (no memory): names and shapes only."""
  return nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt,
                                                    compression=comp))


def shapes(model) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in split(model)[2].items()}
