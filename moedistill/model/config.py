"""ModelConfig: every Qwen3-MoE setting that changes the math, from and to HF config.json."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from moedistill.errors import ConfigError

MODEL_TYPE = "qwen3_moe"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int  # dense-MLP layers
  moe_intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  num_experts: int
  num_experts_per_tok: int
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  router_aux_loss_coef: float = 0.001
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads={self.num_key_value_heads}")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok}: expected 1..num_experts="
                        f"{self.num_experts}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim}: RoPE needs an even head_dim")

  def is_moe_layer(self, i: int) -> bool:
    """Same rule as transformers' Qwen3MoeDecoderLayer."""
    return (i not in self.mlp_only_layers and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

  # --- HF config.json -------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    if d.get("model_type") != MODEL_TYPE:
      raise ConfigError(f"{source}: model_type={d.get('model_type')!r}, expected {MODEL_TYPE!r}")
    if d.get("use_sliding_window"):
      raise ConfigError(f"{source}: use_sliding_window=true is not supported (expected false)")
    if d.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r}, expected 'silu'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ConfigError(f"{source}: rope_type={rope_type!r} is not supported (expected 'default')")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    experts = d.get("num_experts", d.get("num_local_experts"))
    try:
      return cls(
          vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
          intermediate_size=d["intermediate_size"],
          moe_intermediate_size=d["moe_intermediate_size"],
          num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
          num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
          head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
          num_experts=experts if experts is not None else 128,
          num_experts_per_tok=d.get("num_experts_per_tok", 8),
          norm_topk_prob=bool(d.get("norm_topk_prob", False)),
          decoder_sparse_step=d.get("decoder_sparse_step", 1),
          mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
          rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
          tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
          attention_bias=bool(d.get("attention_bias", False)),
          router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
          max_position_embeddings=d.get("max_position_embeddings", 32768),
          bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
          pad_token_id=d.get("pad_token_id"))
    except KeyError as e:
      raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None

  @classmethod
  def from_json_file(cls, path) -> "ModelConfig":
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise ConfigError(f"{path}: not found, expected a Hugging Face config.json") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return cls.from_hf_dict(d, source=str(path))

  def to_hf_dict(self) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "moe_intermediate_size": self.moe_intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
        "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": self.decoder_sparse_step,
        "mlp_only_layers": list(self.mlp_only_layers), "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
        "attention_dropout": 0.0, "hidden_act": "silu",
        "router_aux_loss_coef": self.router_aux_loss_coef,
        "max_position_embeddings": self.max_position_embeddings,
        "use_sliding_window": False, "sliding_window": None, "use_cache": True,
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }


def qwen3_30b_a3b() -> ModelConfig:
  """Qwen/Qwen3-30B-A3B as published on the hub."""
  return ModelConfig(
      vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
      num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
      num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
      rope_theta=1_000_000.0, max_position_embeddings=40960, bos_token_id=151643,
      eos_token_id=151645)


def tiny() -> ModelConfig:
  """Distinct small dims so a transposed weight cannot pass a test by accident."""
  return ModelConfig(
      vocab_size=97, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
      num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=(1,))


PRESETS = {"qwen3_30b_a3b": qwen3_30b_a3b, "tiny": tiny}
