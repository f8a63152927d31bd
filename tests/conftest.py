"""Shared fixtures: tiny random Qwen3-MoE checkpoints written by transformers itself."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_HF = dict(vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=20,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
               num_experts=6, num_experts_per_tok=2, initializer_range=0.1,
               max_position_embeddings=256)


def make_hf_checkpoint(path, seed=0, max_shard_size=None, **overrides):
  """Random-init transformers Qwen3MoeForCausalLM saved with save_pretrained; returns the model."""
  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  torch.manual_seed(seed)
  cfg = Qwen3MoeConfig(**{**TINY_HF, **overrides})
  model = Qwen3MoeForCausalLM(cfg).eval()
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kw)
  return model


def torch_logits(model, tokens, **kw):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.array(tokens)), **kw).logits.float().numpy()


@pytest.fixture
def hf_tiny(tmp_path):
  path = tmp_path / "teacher"
  model = make_hf_checkpoint(path)
  return path, model
