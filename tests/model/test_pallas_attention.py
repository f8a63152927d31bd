"""`model.attention=pallas` (jax's Pallas GPU flash attention, model/pallas_attention.py) in
interpret mode on CPU, the kernel code a GPU runs through the Triton lowering, against the
`plain` path (XLA softmax attention with a dense mask) in value and in the gradients w.r.t.
q, k and v: causal, GQA (kv heads repeated), several documents per row (segment ids), lengths
that need padding to the kernel's blocks, one length past a forward block of 128.
float32: both paths sum a few dozen O(1) terms per output in float32 (in different orders, the
kernel in base 2 with an online softmax), so they agree to ~1e-6 of the output scale; 2e-5
leaves room and no more.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.model import attention, pallas_attention, pallas_gmm

TOL = 2e-5


def _segments(b, t, r):
  """Several documents per row: random cut points, ids increasing along the row."""
  cuts = r.rand(b, t) < 0.15
  cuts[:, 0] = False
  return np.cumsum(cuts, axis=1).astype(np.int32)


def _close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= TOL * scale, (err, scale)


@pytest.mark.parametrize("b,t,n,g,h,segs", [
    (2, 37, 4, 2, 12, True),     # GQA r=2, padded 37 -> 64, documents
    (1, 16, 8, 1, 16, True),     # all query heads on one kv head, no padding
    (2, 20, 4, 4, 10, False),    # MHA, no segment ids, head dim 10 (mha pads it to 16)
    (1, 136, 4, 2, 8, True),     # past one forward block: padded to 256, two q blocks
])
def test_pallas_equals_plain_value_and_grads(b, t, n, g, h, segs):
  r = np.random.RandomState(t + n)
  q = jnp.asarray(r.randn(b, t, n, h), jnp.float32)
  k = jnp.asarray(r.randn(b, t, g, h), jnp.float32)
  v = jnp.asarray(r.randn(b, t, g, h), jnp.float32)
  ct = jnp.asarray(r.randn(b, t, n, h), jnp.float32)
  seg = jnp.asarray(_segments(b, t, r)) if segs else None
  if segs:
    assert all(len(np.unique(np.asarray(seg[i]))) >= 2 for i in range(b))

  def run(impl):
    f = lambda q, k, v: attention.attention(q, k, v, seg, impl=impl)  # noqa: E731
    y, vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
    return (y, *vjp(ct))

  for got, want in zip(run("pallas"), run("plain")):
    _close(got, want)


def test_segments_do_not_leak():
  """A query's output does not change when another document's keys and values change."""
  r = np.random.RandomState(0)
  q, k, v = (jnp.asarray(r.randn(1, 24, 2, 16), jnp.float32) for _ in range(3))
  seg = jnp.asarray(np.repeat([0, 1, 2], 8)[None].astype(np.int32))
  k2, v2 = k.at[:, 8:16].set(5.0), v.at[:, 8:16].set(-3.0)  # change document 1 only
  o1 = attention.attention(q, k, v, seg, impl="pallas")
  o2 = attention.attention(q, k2, v2, seg, impl="pallas")
  np.testing.assert_array_equal(o1[:, :8], o2[:, :8])
  np.testing.assert_array_equal(o1[:, 16:], o2[:, 16:])
  assert not np.allclose(o1[:, 8:16], o2[:, 8:16])


def test_padding_rule():
  assert [pallas_attention.padded_len(t) for t in (1, 16, 17, 100, 128, 129, 300)] == [
      16, 16, 32, 128, 128, 256, 384]


def test_lowers_for_cuda_through_triton():
  """Qwen3-30B-A3B's heads (32 query, 4 kv, head dim 128), bf16, forward and backward, lowered
  for CUDA through Pallas' Triton lowering without a GPU."""
  q = jnp.zeros((1, 128, 32, 128), jnp.bfloat16)
  k = jnp.zeros((1, 128, 4, 128), jnp.bfloat16)
  seg = jnp.zeros((1, 128), jnp.int32)
  f = lambda q, k, v: jnp.sum(attention.attention(q, k, v, seg, impl="pallas")  # noqa: E731
                              .astype(jnp.float32))
  with pallas_gmm.triton_lowering():
    text = jax.jit(jax.value_and_grad(f, (0, 1, 2))).trace(q, k, k).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, backward preprocess, backward
