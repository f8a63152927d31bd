"""Blocked (flash-style) attention equals the plain XLA path in value and gradient, keeps its
temporaries linear in the row length, and a whole model using it still matches transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_checkpoint, torch_logits
from moedistill.errors import ConfigError
from moedistill.hub import hf
from moedistill.model.layers import Runtime
from moedistill.model import attention as A


def _inputs(b, t, n, g, h, segments, seed=0, dtype=jnp.float32):
  r = np.random.RandomState(seed)
  q, k, v, ct = (jnp.asarray(r.randn(b, t, *s, h), dtype) for s in ((n,), (g,), (g,), (n,)))
  segs = None
  if segments:
    # Packed rows: sorted segment ids (documents of random lengths), padding segment 0 last.
    segs = np.sort(r.randint(1, 4, (b, t)), axis=1)
    segs[0, -min(3, t - 1):] = 0
    segs = jnp.asarray(segs, jnp.int32)
  return q, k, v, ct, segs


def _value_and_grads(impl, q, k, v, ct, segs, block):
  def f(q, k, v):
    return jnp.sum(A.attention(q, k, v, segs, impl=impl, block=block).astype(jnp.float32) * ct)
  out = A.attention(q, k, v, segs, impl=impl, block=block)
  return out, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)


CASES = [  # (t, n, g, block, segments)
    (1, 4, 2, 4, False),
    (16, 4, 2, 4, True),     # several full blocks
    (37, 4, 2, 8, True),     # t not a multiple of the block
    (37, 6, 1, 16, True),    # multi-query, one key block covers several query rows
    (23, 3, 3, 64, False),   # one block larger than the row
    (50, 8, 2, 7, True),     # odd block
]


@pytest.mark.parametrize("t,n,g,block,segments", CASES)
def test_blocked_equals_plain_value_and_gradient(t, n, g, block, segments):
  q, k, v, ct, segs = _inputs(2, t, n, g, 8, segments, seed=t + block)
  ref_o, ref_g = _value_and_grads("plain", q, k, v, ct, segs, block)
  o, grads = _value_and_grads("blocked", q, k, v, ct, segs, block)
  np.testing.assert_allclose(o, ref_o, atol=2e-6, rtol=1e-5)
  assert np.abs(ref_g[2]).max() > 0.1  # large enough for the comparison to mean something
  for name, a, b in zip("qkv", grads, ref_g):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_blocked_separate_query_and_key_blocks():
  q, k, v, ct, segs = _inputs(1, 29, 4, 2, 6, True, seed=3)
  ref = A.attention(q, k, v, segs, impl="plain")
  g_ref = jax.grad(lambda q, k, v: jnp.sum(A.attention(q, k, v, segs) * ct), (0, 1, 2))(q, k, v)
  for bq, bk in ((4, 12), (12, 4), (5, 3)):
    np.testing.assert_allclose(A.blocked(q, k, v, segs, bq, bk), ref, atol=2e-6)  # eager
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(A.blocked(q, k, v, segs, bq, bk) * ct),
                         (0, 1, 2)))
    for a, b in zip(g(q, k, v), g_ref):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_blocked_bf16_close_to_plain_bf16():
  q, k, v, ct, segs = _inputs(2, 40, 4, 2, 16, True, seed=5, dtype=jnp.bfloat16)
  o, grads = _value_and_grads("blocked", q, k, v, ct, segs, 16)
  ref_o, ref_g = _value_and_grads("plain", q, k, v, ct, segs, 16)
  assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in grads)
  np.testing.assert_allclose(np.float32(o), np.float32(ref_o), atol=0.03)
  for a, b in zip(grads, ref_g):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=0.1 * np.abs(np.float32(b)).max())


def _temp_bytes(impl, t, block=128):
  b, n, g, h = 1, 4, 2, 16
  shapes = [jax.ShapeDtypeStruct((b, t, x, h), jnp.float32) for x in (n, g, g)]
  segs = jax.ShapeDtypeStruct((b, t), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(A.attention(q, k, v, s, impl=impl, block=block))  # noqa: E731
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(*shapes, segs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blocked_memory_is_linear_in_row_length():
  """Forward + backward temporaries (compiled memory analysis) when the row doubles: plain
  grows ~4x ([t, t] scores and saved probabilities), blocked ~2x (one tile plus O(t) rows)."""
  plain = [_temp_bytes("plain", t) for t in (1024, 2048)]
  blocked = [_temp_bytes("blocked", t) for t in (1024, 2048, 4096)]
  assert plain[1] / plain[0] > 3.5, plain
  assert blocked[1] / blocked[0] < 2.3 and blocked[2] / blocked[1] < 2.3, blocked
  assert blocked[1] < plain[1] / 8, (blocked, plain)


def test_auto_choice_on_cpu():
  assert not A.nvidia_gpu()  # CPU: cuDNN is never picked, nothing here depends on it
  assert A.resolve("auto", 128, jnp.bfloat16, 512) == "plain"
  assert A.resolve("auto", 4096, jnp.bfloat16, 512) == "blocked"
  assert A.resolve("plain", 4096, jnp.float32, 512) == "plain"
  with pytest.raises(ConfigError, match="attention='flash'"):
    A.resolve("flash", 128, jnp.float32, 512)


def test_config_refuses_cudnn_without_nvidia_gpu(tmp_path):
  import ml_collections

  from conftest import job_config
  from moedistill.config import job_from_config
  for field, value, msg in (("attention", "cudnn", "needs an NVIDIA GPU"),
                            ("attention", "flash", "expected one of"),
                            ("attention_block", 0, "expected a positive integer"),
                            ("remat", "some", "expected one of"),
                            ("scan_layers", "yes", "expected True or False")):
    c = job_config(tmp_path, tmp_path / "teacher")
    # As a config file loaded from JSON would hold it (a ConfigDict field keeps its type).
    c.model = ml_collections.ConfigDict({**c.model.to_dict(), field: value})
    with pytest.raises(ConfigError, match=f"config.model.{field}=.*{msg}"):
      job_from_config(c)


def test_model_with_blocked_attention_matches_transformers(tmp_path):
  """Packed documents through blocked attention (block 4: rows cross several blocks) give
  the logits transformers gives each document alone."""
  ref_model = make_hf_checkpoint(tmp_path)
  model, cfg = hf.load_model(tmp_path, Runtime(attention="blocked", attention_block=4))
  r = np.random.RandomState(4)
  docs = [r.randint(0, cfg.vocab_size, (1, n)) for n in (9, 6, 2)]
  tokens = np.concatenate(docs, axis=1)
  segs = np.concatenate([np.full((1, d.shape[1]), i + 1) for i, d in enumerate(docs)], axis=1)
  whole = torch_logits(ref_model, tokens)
  logits = jax.jit(lambda t: model(t)[0])(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(logits), whole, atol=1e-4, rtol=0)
  packed = jax.jit(lambda t, s: model(t, s)[0])(jnp.asarray(tokens), jnp.asarray(segs))
  start = 0
  for d in docs:
    alone = torch_logits(ref_model, d)
    assert np.abs(alone).max() > 0.5
    np.testing.assert_allclose(np.asarray(packed[:, start:start + d.shape[1]]), alone,
                               atol=1e-4, rtol=0)
    start += d.shape[1]
