"""Logits parity with transformers' Qwen3MoeForCausalLM (float32, CPU) on several configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_checkpoint, torch_logits
from moedistill.hub import hf
from moedistill.model.layers import Runtime

CASES = {
    "norm_topk_on": dict(norm_topk_prob=True),
    "norm_topk_off": dict(norm_topk_prob=False),
    "dense_layers": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "kv_heads_1": dict(num_key_value_heads=1),
    "kv_heads_eq_heads": dict(num_key_value_heads=4),
    "head_dim_not_hidden_over_heads": dict(head_dim=20, rope_parameters={
        "rope_type": "default", "rope_theta": 5000.0}),
    "attention_bias": dict(attention_bias=True),
    "sharded_files": dict(max_shard_size="20KB"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
  kw = dict(CASES[name])
  ref_model = make_hf_checkpoint(tmp_path, seed=len(name), **kw)
  if name == "sharded_files":
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert (tmp_path / hf.INDEX).exists()
  model, cfg = hf.load_model(tmp_path)
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 17))
  ref = torch_logits(ref_model, tokens)
  eager, _ = model(jnp.asarray(tokens))
  jitted = jax.jit(lambda t: model(t)[0])(jnp.asarray(tokens))
  assert np.abs(ref).max() > 0.5  # weights large enough for the comparison to mean something
  np.testing.assert_allclose(np.asarray(eager), ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(jitted), ref, atol=1e-4, rtol=0)


def test_router_logits_returned_per_moe_layer(tmp_path):
  import torch
  ref_model = make_hf_checkpoint(tmp_path, num_hidden_layers=3, mlp_only_layers=[1])
  model, cfg = hf.load_model(tmp_path)
  tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 9))
  _, aux = model(jnp.asarray(tokens))
  with torch.no_grad():
    out = ref_model(torch.as_tensor(tokens), output_router_logits=True)
  assert len(aux["router_logits"]) == len(out.router_logits) == 2
  for ours, theirs in zip(aux["router_logits"], out.router_logits):
    np.testing.assert_allclose(np.asarray(ours).reshape(-1, cfg.num_experts),
                               theirs.numpy(), atol=1e-5)


def test_bf16_compute_close_to_f32(hf_tiny):
  path, ref_model = hf_tiny
  model, cfg = hf.load_model(path, Runtime(dtype=jnp.bfloat16))
  tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 13))
  logits, _ = model(jnp.asarray(tokens))
  assert logits.dtype == jnp.bfloat16
  ref = torch_logits(ref_model, tokens)
  err = np.abs(np.asarray(logits, np.float32) - ref).max()
  assert err < 0.05 * np.abs(ref).max(), err
