"""Run as a script under 8 forced CPU devices: loss and gradient of a tiny student with each
memory policy (remat, blocked attention, scanned layers) on sharded meshes, against the
plain unrolled model on one device; prints JSON {spec: [loss diff, max grad diff, max grad]}."""
import dataclasses
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
from flax import nnx  # noqa: E402

from moedistill import sharding  # noqa: E402
from moedistill.model import tiny  # noqa: E402
from moedistill.model.layers import Runtime  # noqa: E402
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402
from moedistill.model.shared_core import Compression  # noqa: E402
from moedistill.training import param_tree as P  # noqa: E402
from sharded_step_check import batch  # noqa: E402

CFG = dataclasses.replace(tiny(), mlp_only_layers=())  # scan_layers needs identical layers


def loss_and_grads(mesh_shape, rt):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  model = Qwen3MoeForCausalLM(CFG, rngs=nnx.Rngs(0), runtime=rt, compression=Compression(3, 3, 2))
  graphdef, template, params = P.split(model)
  axes = P.logical_axes(template)
  params = {k: jax.device_put(v, jax.sharding.NamedSharding(
      mesh, sharding.spec_for(v.shape, axes[k], mesh))) for k, v in params.items()}
  b = {k: sharding.global_batch(mesh, v) for k, v in batch(CFG).items()}

  def loss(params):
    logits, aux = P.merge(graphdef, template, params)(b["tokens"], b["segment_ids"])
    return (jnp.mean(logits.astype(jnp.float32) ** 2)
            + sum(jnp.mean(r ** 2) for r in aux["router_logits"]))

  value, grads = jax.jit(sharding.on_mesh(mesh, jax.value_and_grad(loss)))(params)
  return float(value), {k: np.asarray(v) for k, v in grads.items()}


if __name__ == "__main__":
  ref_v, ref_g = loss_and_grads((1, 1, 1, 1), Runtime())
  out = {}
  for spec in sys.argv[1:]:  # "data,fsdp,expert,tensor:remat:attention:scan"
    mesh_s, remat, attn, scan = spec.split(":")
    v, g = loss_and_grads(tuple(int(x) for x in mesh_s.split(",")),
                          Runtime(remat=remat, attention=attn, attention_block=4,
                                  scan_layers=scan == "scan"))
    out[spec] = [abs(v - ref_v), max(float(np.abs(g[k] - ref_g[k]).max()) for k in ref_g),
                 max(float(np.abs(x).max()) for x in ref_g.values())]
  print(json.dumps(out))
