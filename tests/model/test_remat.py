"""Remat policies change only what is saved for the backward: each equals `none` in value and
gradient (float32), with micro-batches in a train step, with the layers scanned
(Runtime.scan_layers) instead of unrolled and blocked attention, and on sharded meshes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharded_step_check as S
from moedistill.config import Group, Stage, TrainConfig
from moedistill.errors import ConfigError
from moedistill.model import tiny
from moedistill.model.layers import REMAT_POLICIES, Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import Compression
from moedistill.training import optim, param_tree as P
from moedistill.training.train_step import StepConfig, make_train_step

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

POLICIES = list(REMAT_POLICIES)


def _student(rt):
  return Qwen3MoeForCausalLM(tiny(), rngs=nnx.Rngs(0), runtime=rt,
                             compression=Compression(3, 3, 2))


def test_each_policy_equals_none_in_value_and_gradient():
  batch = S.batch(tiny())
  tokens, segs = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
  out = {}
  for remat in POLICIES:
    g, st = nnx.split(_student(Runtime(remat=remat)))

    def f(st):
      logits, aux = nnx.merge(g, st)(tokens, segs)
      return jnp.sum(logits ** 2) + sum(jnp.sum(r ** 2) for r in aux["router_logits"])

    out[remat] = jax.jit(jax.value_and_grad(f))(st)
  assert POLICIES == ["none", "full", "dots"]
  ref_v, ref_g = out["none"]
  for remat in POLICIES[1:]:
    v, grads = out[remat]
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_g)):
      # Recomputation may fuse differently: float32 reduction-order noise only.
      scale = max(np.abs(b[...]).max(), 1e-3)
      np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6 * scale,
                                 err_msg=f"{remat} {path}")


def _one_step(remat, micro):
  """(metrics, gradients of the trainable params) of one train step."""
  model = _student(Runtime(remat=remat))
  g, t, params = P.split(model)
  stage = Stage("s", 1, 0.0, (Group(".*embed.*", 0.0, None), Group(".*", 1.0, None)), 1e-2, 0.5,
                2.0, 0)
  tc = TrainConfig(8, micro, "bucket", 32, "constant", 0.1, 0.0, 1.0, 0.9, 0.99, 10, 2, 1,
                   (stage,))
  _, paths, _ = optim.build(stage, tc, {k: v.shape for k, v in params.items()}, 1)
  tx = S.capture_gradients()  # its state after the step is the step's gradients
  tr = {k: v for k, v in params.items() if k in paths}
  fr = {k: v for k, v in params.items() if k not in paths}
  # Router aux loss off: it is per micro-batch by design, so only it would differ.
  sc = StepConfig(0.5, 2.0, "bucket", 1, 32, micro, 0.0, tiny().num_experts_per_tok)
  batch = {k: jnp.asarray(v) for k, v in S.batch(tiny()).items()}
  _, grads, m = jax.jit(make_train_step(g, t, tx, sc))(tr, fr, tx.init(tr), batch)
  return m, grads


def test_micro_batches_with_each_policy_match_one_batch_without_remat():
  ref_m, ref_p = _one_step("none", 1)
  for remat in POLICIES[1:]:  # none with micro-batches: tests/training/test_sharded_step.py
    m, p = _one_step(remat, 4)
    for key in ("loss", "kl", "grad_norm"):
      np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5, err_msg=f"{remat} {key}")
    top = max(np.abs(np.asarray(v)).max() for v in ref_p.values())
    assert top > 0
    for k in ref_p:
      # The gradients themselves (after an Adam step, ~lr*sign(g), any gradient of the right
      # sign passed): float32 sums over 4 micro-batches in another order differ by < 1e-6 of
      # a param's largest entry (measured: 6.5e-7); a recomputation that changed a value, by
      # far more. Params whose true gradient is 0 (the routers and wrapper `a` factors: with
      # zero-initialised wrapper `b` factors every expert computes the same) hold only
      # rounding noise, measured against 1e-4 of the largest gradient of the model.
      a, b = np.asarray(p[k]), np.asarray(ref_p[k])
      assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-4 * top), (remat, k)


def test_unknown_policy_is_refused():
  with pytest.raises(ConfigError, match="remat='some'"):
    _student(Runtime(remat="some"))


def test_scan_layers_equals_unrolled_and_keeps_param_paths():
  """lax.scan over the layers (params stacked inside the step) with each policy and blocked
  attention: the value, gradient and `layers.N....` paths of the plain unrolled model."""
  cfg = dataclasses.replace(tiny(), mlp_only_layers=())  # scan needs identical layers
  batch = S.batch(cfg)
  tokens, segs = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])

  def value_and_grad(rt):
    m = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt, compression=Compression(3, 3, 2))
    g, st = nnx.split(m)

    def f(st):
      logits, aux = nnx.merge(g, st)(tokens, segs)
      return jnp.sum(logits ** 2) + sum(jnp.sum(r ** 2) for r in aux["router_logits"])
    return jax.jit(jax.value_and_grad(f))(st)

  ref_v, ref_g = value_and_grad(Runtime())
  ref_flat = dict(nnx.to_flat_state(ref_g))
  for remat in POLICIES:
    v, grads = value_and_grad(Runtime(scan_layers=True, remat=remat, attention="blocked",
                                      attention_block=4))
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    flat = dict(nnx.to_flat_state(grads))
    assert flat.keys() == ref_flat.keys() and ("layers", 2, "mlp", "gate", "kernel") in flat
    for path, b in ref_flat.items():
      scale = max(np.abs(b[...]).max(), 1e-3)
      np.testing.assert_allclose(flat[path][...], b[...], rtol=1e-4, atol=1e-6 * scale,
                                 err_msg=f"{remat} {path}")


def test_scan_layers_refuses_mixed_layers():
  with pytest.raises(ConfigError, match=r"scan_layers=True needs identical layers, but layers "
                     r"\(0, 2\) are MoE"):
    Qwen3MoeForCausalLM(tiny(), rngs=nnx.Rngs(0), runtime=Runtime(scan_layers=True))


def test_policies_on_sharded_meshes_match_one_device():
  """Each policy (with blocked attention and scanned layers) on fsdp / expert / tensor meshes
  of 8 forced CPU devices gives the one-device plain model's loss and gradient."""
  import json
  import pathlib
  import subprocess
  import sys
  specs = ["2,4,1,1:dots:blocked:scan", "2,1,2,2:full:blocked:loop", "1,2,2,2:none:plain:scan"]
  script = pathlib.Path(__file__).resolve().parents[1] / "memory_policies_check.py"
  r = subprocess.run([sys.executable, str(script), *specs], capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for spec in specs:
    loss_diff, grad_diff, grad_max = out[spec]
    assert grad_max > 0.01 and loss_diff < 1e-5 and grad_diff < 1e-5 * grad_max, (spec, out)
