"""Sharded equivalence on 8 forced CPU devices: loss and updated params on meshes
(8,1,1,1), (2,4,1,1), (2,1,2,2) match one device; micro-batches 1 vs 4 agree."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

SPECS = ["1,1,1,1:1:0.01", "8,1,1,1:1:0.01", "2,4,1,1:1:0.01", "2,1,2,2:1:0.01",
         "1,1,1,1:1:0", "2,1,2,2:4:0"]


def test_meshes_and_micro_batches_match_one_device():
  script = pathlib.Path(__file__).resolve().parents[1] / "sharded_step_check.py"
  r = subprocess.run([sys.executable, str(script), *SPECS], capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])

  def same(a, b):
    np.testing.assert_allclose(out[a]["losses"], out[b]["losses"], rtol=1e-5)
    assert out[a]["params"].keys() == out[b]["params"].keys()
    for k in out[a]["params"]:
      assert len(out[a]["params"][k]) == len(out[b]["params"][k]) == out[a]["sizes"][k], k
      # One SGD step at lr 1e-2: params = p0 - 1e-2*g, so atol 1e-7 bounds every gradient
      # element's difference by 1e-5 (measured: <= 3.7e-9, float32 rounding of the params).
      np.testing.assert_allclose(out[a]["params"][k], out[b]["params"][k], rtol=0, atol=1e-7,
                                 err_msg=f"{a} vs {b}: {k}")

  for spec in SPECS[1:4]:
    same(SPECS[0], spec)
  same("1,1,1,1:1:0", "2,1,2,2:4:0")  # micro-batching (aux loss off: it is per micro-batch)
  assert "layers.0.mlp.experts.wrapper.gate_a" in out[SPECS[0]]["params"]
  assert "embed_tokens.embedding" not in out[SPECS[0]]["params"]  # frozen: not even updated


def test_bf16_compute_train_step_close_to_f32():
  """fp32 params with bf16 compute (the accelerator default) trains like float32."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import sharded_step_check as S
  from moedistill.config import Group, Stage, TrainConfig
  from moedistill.model import tiny
  from moedistill.model.layers import Runtime
  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  from moedistill.model.shared_core import Compression
  from moedistill.training import optim, param_tree as P
  from moedistill.training.train_step import StepConfig, make_train_step
  cfg = tiny()
  batch = {k: jnp.asarray(v) for k, v in S.batch(cfg).items()}
  losses = {}
  for dt in (jnp.float32, jnp.bfloat16):
    model = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime(dtype=dt),
                                compression=Compression(3, 3, 2))
    g, t, params = P.split(model)
    stage = Stage("s", 2, 0.0, (Group(".*", 1.0, None),), 1e-2, 0.5, 2.0, 0)
    tc = TrainConfig(8, 1, "bucket", 32, "constant", 0.1, 0.0, 1.0, 0.9, 0.99, 10, 2, 1, (stage,))
    tx, _, _ = optim.build(stage, tc, {k: v.shape for k, v in params.items()}, 2)
    step = jax.jit(make_train_step(g, t, tx, StepConfig(0.5, 2.0, "bucket", 1, 32, 1, 0.01, 2)))
    opt = tx.init(params)
    out = []
    for _ in range(2):
      params, opt, m = step(params, {}, opt, batch)
      out.append(float(m["loss"]))
      assert all(v.dtype == jnp.float32 for v in params.values())  # params stay fp32
    losses[dt] = out
  np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=0.02)
