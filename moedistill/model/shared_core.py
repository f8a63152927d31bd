"""Compressed experts: W_e = shared_core + A_e @ B_e (rank r per projection), never materialised.

Legend: t tokens, e experts, d hidden, f expert intermediate, r wrapper rank, g grouped rows.
Forward per MoE layer:
  gate_g = expand(x @ core.gate) + (expand(x) @ A_gate_e) @ B_gate_e     (same for up)
  h_g    = silu(gate_g) * up_g
  y_t    = combine(h_g) @ core.down + combine((h_g @ A_down_e) @ B_down_e)
so the core projections run once per token (down on the router-weighted sum) and only the
low-rank parts run per expert copy, as grouped matmuls through the dispatch seam.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moedistill.errors import ConfigError
from moedistill.model.config import ModelConfig
from moedistill.model.layers import Runtime, param

PROJS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Compression:
  rank_gate: int
  rank_up: int
  rank_down: int
  core: str = "mean"  # how the core was initialised: mean | routing_weighted

  def rank(self, proj: str) -> int:
    return getattr(self, f"rank_{proj}")

  def check(self, cfg: ModelConfig):
    full = min(cfg.hidden_size, cfg.moe_intermediate_size)
    for p in PROJS:
      if not 0 < self.rank(p) <= full:
        raise ConfigError(f"compression rank_{p}={self.rank(p)}: expected 1..{full} "
                          f"(min of hidden_size and moe_intermediate_size)")

  def to_dict(self):
    return {"format": "shared_core_lowrank", **dataclasses.asdict(self)}

  @classmethod
  def from_dict(cls, d, source="config.json"):
    if d.get("format") != "shared_core_lowrank":
      raise ConfigError(f"{source}: compression.format={d.get('format')!r}, "
                        "expected 'shared_core_lowrank'")
    return cls(rank_gate=int(d["rank_gate"]), rank_up=int(d["rank_up"]),
               rank_down=int(d["rank_down"]), core=d.get("core", "mean"))


def proj_shapes(cfg: ModelConfig, proj: str) -> tuple[int, int]:
  d, f = cfg.hidden_size, cfg.moe_intermediate_size
  return (f, d) if proj == "down" else (d, f)


class SharedCore(nnx.Module):
  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    for p in PROJS:
      din, dout = proj_shapes(cfg, p)
      axes = ("expert_mlp", "embed") if p == "down" else ("embed", "expert_mlp")
      setattr(self, p, param(rngs, (din, dout), axes, rt))


class Wrapper(nnx.Module):
  def __init__(self, cfg: ModelConfig, comp: Compression, rt: Runtime, rngs: nnx.Rngs):
    e = cfg.num_experts
    for p in PROJS:
      din, dout = proj_shapes(cfg, p)
      r = comp.rank(p)
      ain = "expert_mlp" if p == "down" else "embed"
      bout = "embed" if p == "down" else "expert_mlp"
      setattr(self, f"{p}_a", param(rngs, (e, din, r), ("expert", ain, None), rt))
      setattr(self, f"{p}_b", param(None, (e, r, dout), ("expert", None, bout), rt, "zeros"))


class SharedCoreExperts(nnx.Module):
  def __init__(self, cfg: ModelConfig, comp: Compression, rt: Runtime, rngs: nnx.Rngs):
    comp.check(cfg)
    self.shared_core = SharedCore(cfg, rt, rngs)
    self.wrapper = Wrapper(cfg, comp, rt, rngs)
    self.rt = rt

  def _low_rank(self, dispatch, a_g, proj):
    w = self.wrapper
    return dispatch.gmm(dispatch.gmm(a_g, getattr(w, f"{proj}_a")[...]),
                        getattr(w, f"{proj}_b")[...])

  def __call__(self, dispatch, x_td):
    dt = self.rt.dtype
    core = {p: getattr(self.shared_core, p)[...].astype(dt) for p in PROJS}
    x_td = x_td.astype(dt)
    x_g = dispatch.expand(x_td)
    gate_g = dispatch.expand(x_td @ core["gate"]) + self._low_rank(dispatch, x_g, "gate")
    up_g = dispatch.expand(x_td @ core["up"]) + self._low_rank(dispatch, x_g, "up")
    h_g = jax.nn.silu(gate_g) * up_g
    return dispatch.combine(h_g) @ core["down"] + dispatch.combine(
        self._low_rank(dispatch, h_g, "down"))


def merged_experts(core_df, a_edr, b_erf):
  """W_e = core + A_e @ B_e, stacked [e, din, dout] (for export and tests)."""
  return core_df[None] + jnp.einsum("edr,erf->edf", a_edr, b_erf)
