"""Run as a script under 8 forced CPU devices: one SGD train step of a tiny student on several
meshes and with micro-batches; prints JSON of losses and every value of every updated param."""
import json
import os
import sys

if __name__ == "__main__":  # only as a script: an import must not leak 8 devices to others
  flags = os.environ.get("XLA_FLAGS", "")  # the suite's, see conftest
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from moedistill import sharding  # noqa: E402
from moedistill.config import Group, Stage, TrainConfig  # noqa: E402
from moedistill.model import tiny  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402
from moedistill.model.shared_core import Compression  # noqa: E402
from moedistill.training import optim, param_tree as P  # noqa: E402
from moedistill.training.train_step import StepConfig, make_train_step  # noqa: E402


def batch(cfg, b=8, t=12, k=5, seed=0):
  r = np.random.RandomState(seed)
  tokens = r.randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
  segs = np.ones((b, t), np.int32)
  segs[:, t // 2:] = 2
  segs[-1, -3:] = 0  # padding
  logits = r.randn(b, t, cfg.vocab_size).astype(np.float32) * 2
  idx = np.argsort(-logits, -1)[..., :k].astype(np.int32)
  lse = np.stack([np.log(np.exp(logits / T).sum(-1)) for T in (1.0, 2.0)], -1)
  return {"tokens": tokens, "segment_ids": segs, "topk_idx": idx,
          "topk_logit": np.take_along_axis(logits, idx, -1).astype(jnp.bfloat16),
          "lse": lse.astype(np.float32)}


def capture_gradients():
  """An optax transformation whose state is the last gradient it was given and whose update
  is zero: the step's gradients come back exactly as computed (no optimizer in between)."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def run(mesh_shape, micro, aux_coef, grads: bool = False):
  """One step; `grads`: return the trainable params' gradients ("grads") instead of the
  params after an SGD step."""
  cfg = tiny()
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:int(np.prod(mesh_shape))])
  model = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), compression=Compression(3, 3, 2))
  graphdef, template, params = P.split(model)
  axes = P.logical_axes(template)
  params = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, sharding.spec_for(
      v.shape, axes[k], mesh))) for k, v in params.items()}
  stage = Stage("s", 3, 0.0, (Group(".*embed.*", 0.0, None), Group(".*", 1.0, None)), 1e-2, 0.5,
                2.0, 0)
  tc = TrainConfig(8, micro, "bucket", 32, "constant", 0.1, 0.01, 1.0, 0.9, 0.99, 10, 2, 1,
                   (stage,))
  _, paths, _ = optim.build(stage, tc, {k: v.shape for k, v in params.items()}, 3)
  # Plain SGD: the update is the gradient itself, so any wrong gradient shows in the params,
  # even a wrong scale, which Adam's first step (~lr*sign(g)) would hide.
  tx = capture_gradients() if grads else optax.sgd(1e-2)
  tr = {k: v for k, v in params.items() if k in paths}
  fr = {k: v for k, v in params.items() if k not in paths}
  sc = StepConfig(0.5, 2.0, "bucket", 1, 32, micro, aux_coef, cfg.num_experts_per_tok)
  step = jax.jit(make_train_step(graphdef, template, tx, sc))
  opt = tx.init(tr)
  b = {k: sharding.global_batch(mesh, v) for k, v in batch(cfg).items()}
  losses = []
  for _ in range(1):
    tr, opt, m = step(tr, fr, opt, b)
    losses += [float(m["loss"]), float(m["grad_norm"]), float(m["kl"])]
  out = opt if grads else tr
  return {"losses": losses, ("grads" if grads else "params"): {
      k: np.asarray(v).ravel().tolist() for k, v in out.items()},
          "sizes": {k: int(v.size) for k, v in tr.items()}}


if __name__ == "__main__":
  out = {}
  for spec in sys.argv[1:]:
    mesh_s, micro, aux = spec.split(":")
    out[spec] = run(tuple(int(x) for x in mesh_s.split(",")), int(micro), float(aux))
  print(json.dumps(out))
