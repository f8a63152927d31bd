"""Expert parallelism on 8 forced CPU devices equals one device: MoE layer output, router
logits and gradients w.r.t. the input and every weight (float32), on meshes
(data, fsdp, expert, tensor) = (8,1,1,1), (1,8,1,1), (1,1,8,1), (2,1,4,1), (1,1,4,2), with
dense (teacher) and shared-core (student) experts, even and very uneven routing, the dropless
and the capacity backends; a whole train step on (2,1,4,1); bad layouts refused before compiling;
the dropless `sorted` path's run-time skip of the empty receive tiles (gmm.tiled_matmul_live)
against a plain dense product, value and gradients.

The device work runs in a child process (`python tests/model/test_expert_parallel.py CASE...`) so the
8 forced devices never leak into other tests; it prints one JSON line of max differences.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

if __name__ == "__main__":  # only as a script: an import must not leak 8 devices to others
  flags = os.environ.get("XLA_FLAGS", "")  # the suite's, see conftest
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

MESHES = ["8,1,1,1", "1,8,1,1", "1,1,8,1", "2,1,4,1", "1,1,4,2"]


def _cfg():
  import dataclasses
  from moedistill.model import tiny
  # 8 experts (divisible by every expert axis above), top-3, intermediate 12 (tensor=2 -> 6).
  return dataclasses.replace(tiny(), num_experts=8, num_experts_per_tok=3)


def _block(cfg, kind: str, backend: str, uneven: bool, capacity_factor: float | None = None,
           ep_capacity_factor: float = 0.0):
  import jax.numpy as jnp
  from flax import nnx
  from moedistill.model.layers import Runtime
  from moedistill.model.qwen3_moe import DenseExperts, MoeBlock
  from moedistill.model.shared_core import Compression, SharedCoreExperts
  # capacity: a factor of experts/k gives every expert room for every token (no drops), so the
  # layer equals one device; with drops, the capacity is per shard (see test_capacity_drops).
  cf = capacity_factor or (cfg.num_experts / cfg.num_experts_per_tok)
  rt = Runtime(moe_backend=backend, capacity_factor=cf, ep_capacity_factor=ep_capacity_factor)
  rngs = nnx.Rngs(0)
  experts = (DenseExperts(cfg, rt, rngs) if kind == "dense"
             else SharedCoreExperts(cfg, Compression(5, 4, 3), rt, rngs))
  if kind != "dense":  # the wrappers' B start at zero: give them values so dW_a is not zero
    for p in ("gate", "up", "down"):
      b = getattr(experts.wrapper, f"{p}_b")
      b[...] = 0.3 * jnp.sin(jnp.arange(b[...].size, dtype=jnp.float32)).reshape(b[...].shape)
  block = MoeBlock(cfg, rt, rngs, experts)
  if uneven:  # input dim 0 carries a large constant: expert 5 tops every token's choice
    block.gate.kernel[...] = block.gate.kernel[...].at[0, 5].set(3.0)
  return block


def _inputs(cfg, uneven: bool, rows=8, seq=6):
  r = np.random.RandomState(1)
  x = r.randn(rows, seq, cfg.hidden_size).astype(np.float32)
  if uneven:
    x[..., 0] = 4.0
  ct = r.randn(rows, seq, cfg.hidden_size).astype(np.float32)
  return x, ct


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's documented semantics from all_gather and a scatter, so the
  GPU transport's offsets run (forward and backward) on CPU, where XLA lacks the op."""
  import jax
  import jax.numpy as jnp
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  rows = jax.lax.all_gather(operand, axis_name)  # [n, M, w]
  start, size, at = (jax.lax.all_gather(v, axis_name)[:, me]
                     for v in (input_offsets, send_sizes, output_offsets))
  r = jnp.arange(operand.shape[0])[None]
  valid = (r >= start[:, None]) & (r < (start + size)[:, None])
  target = jnp.where(valid, at[:, None] + r - start[:, None], output.shape[0])
  return output.at[target.reshape(-1)].set(rows.reshape(-1, operand.shape[-1]), mode="drop")


def layer_case(mesh_s: str, kind: str, backend: str, uneven: bool, transport="auto") -> dict:
  """Max |difference| to one device of y, router logits, dL/dx and dL/dW for each weight."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from moedistill import sharding
  if transport == "ragged":
    from moedistill.model import expert_parallel as EP
    EP.ragged_transport = lambda: True
    jax.lax.ragged_all_to_all = emulated_ragged_all_to_all
  cfg = _cfg()
  block = _block(cfg, kind, backend, uneven)
  graphdef, state = nnx.split(block)
  x, ct = _inputs(cfg, uneven)

  def loss(state, x):
    y, logits, dropped = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * ct) + 0.1 * jnp.sum(jnp.sin(logits)), (y, logits, dropped)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, ref), ref_g = fn(state, x)
  shape = tuple(int(v) for v in mesh_s.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
  put = lambda v: jax.device_put(v.get_value(), sharding.param_sharding(  # noqa: E731
      mesh, v.shape, v.get_metadata().get("logical_axes")))
  sh_state = jax.tree.map(lambda v: v.replace(put(v)), state,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
  xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  with jax.set_mesh(mesh):
    (_, out), g = fn(sh_state, xs)
    hlo = fn.lower(sh_state, xs).as_text()
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))  # noqa: E731
  res = {"y": diff(out[0], ref[0]), "logits": diff(out[1], ref[1]), "dx": diff(g[1], ref_g[1]),
         "dropped": [int(out[2]), int(ref[2])], "all_to_all": hlo.count("all_to_all"),
         "shard_map": "shard_map" in hlo or "manual" in hlo,
         "scale": {k: float(np.max(np.abs(np.asarray(v)))) for k, v in
                   (("y", ref[0]), ("logits", ref[1]), ("dx", ref_g[1]))}}
  flat_g, flat_r = nnx.to_flat_state(g[0]), nnx.to_flat_state(ref_g[0])
  res["dW"] = {".".join(map(str, p)): diff(a.get_value(), b.get_value())
               for (p, a), (_, b) in zip(flat_g, flat_r)}
  res["dW_scale"] = {".".join(map(str, p)): float(np.max(np.abs(np.asarray(b.get_value()))))
                     for p, b in flat_r}
  # Expert 5's share of copies, to show the routing really is uneven.
  _, _, e_tk = __import__("moedistill.model.moe", fromlist=["route"]).route(
      jnp.asarray(x.reshape(-1, cfg.hidden_size)), block.gate.kernel[...],
      cfg.num_experts_per_tok, cfg.norm_topk_prob)
  res["top_share"] = float(np.max(np.bincount(np.asarray(e_tk).ravel(), minlength=8))
                           / e_tk.shape[0])
  return res


def step_case(mesh_s: str) -> dict:
  """The gradients of one train step of a tiny shared-core student with 8 experts
  (sharded_step_check.run) on a mesh; counts the MoE layers that went through shard_map."""
  import dataclasses
  import jax
  import sharded_step_check as S
  from moedistill import sharding
  from moedistill.model import expert_parallel as EP
  cfg = dataclasses.replace(_cfg(), num_experts_per_tok=2)
  S.tiny = lambda: cfg
  calls, orig = [], EP.moe_block
  EP.moe_block = lambda *a: calls.append(1) or orig(*a)
  shape = tuple(int(v) for v in mesh_s.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(*shape), jax.devices()[:int(np.prod(shape))])
  with jax.set_mesh(mesh):
    out = S.run(shape, 1, 0.01, grads=True)
  return {**out, "ep_layers": len(calls)}


def _run_block(block, x, mesh_s: str):
  """The block's (y, aux, dropped) on the mesh `mesh_s` ("d,f,e,t"), x split over its batch
  shards; and the mesh."""
  import jax
  from flax import nnx
  from moedistill import sharding
  mesh = sharding.make_mesh(sharding.MeshConfig(*(int(v) for v in mesh_s.split(","))))
  graphdef, state = nnx.split(block)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
        state, jax.device_put(x, sharding.batch_sharding(mesh, 3)))
  return out, mesh


def drops_case(mesh_s: str) -> dict:
  """Capacity backend with drops (uneven routing, factor 1.25): under expert parallelism the
  capacity is per batch shard, so the count must equal the one-device dispatch run on each
  shard's tokens alone, summed."""
  import jax.numpy as jnp
  from moedistill import sharding
  from moedistill.model import moe
  cfg = _cfg()
  block = _block(cfg, "dense", "capacity", True, capacity_factor=1.25)
  x, _ = _inputs(cfg, True)
  (_, _, got), mesh = _run_block(block, x, mesh_s)
  want = 0
  for rows in np.split(x, sharding.batch_divisor(mesh)):
    _, w_tk, e_tk = moe.route(jnp.asarray(rows.reshape(-1, cfg.hidden_size)),
                              block.gate.kernel[...], cfg.num_experts_per_tok, True)
    want += int(moe.CapacityDispatch(e_tk, w_tk, cfg.num_experts, 1.25).dropped)
  return {"got": int(got), "want": want}


def bounded_case(mesh_s: str) -> dict:
  """Dropless backend with bounded all-to-all buffers (ep_capacity_factor=1, uneven routing):
  per shard and destination device, the copies past B = ceil(t*k/n) drop; count them in numpy."""
  import jax.numpy as jnp
  from moedistill import sharding
  from moedistill.model import moe
  cfg = _cfg()
  block = _block(cfg, "dense", "sorted", True, ep_capacity_factor=1.0)
  x, _ = _inputs(cfg, True)
  (y, _, got), mesh = _run_block(block, x, mesh_s)
  n, k, want, y_ref = mesh.shape["expert"], cfg.num_experts_per_tok, 0, []
  w = {p: np.asarray(getattr(block.experts, f"{p}_proj")[...]) for p in ("gate", "up", "down")}
  for rows in np.split(x, sharding.batch_divisor(mesh)):
    x_td = rows.reshape(-1, cfg.hidden_size)
    _, wt_tk, e_tk = (np.asarray(a) for a in moe.route(jnp.asarray(x_td),
                                                         block.gate.kernel[...], k, True))
    bound = -(-e_tk.shape[0] * k // n)
    flat = e_tk.ravel()
    order = np.argsort(flat, kind="stable")  # the kept copies: each destination's first B
    dest = flat[order] // (cfg.num_experts // n)
    rank = np.arange(flat.size) - np.searchsorted(dest, dest)
    keep = np.ones(flat.size, bool)
    keep[order[rank >= bound]] = False
    want += int((~keep).sum())
    wt_tk = wt_tk * keep.reshape(e_tk.shape)
    h = [(lambda g, u: g / (1 + np.exp(-g)) * u)(x_td @ w["gate"][e], x_td @ w["up"][e])
         @ w["down"][e] for e in range(cfg.num_experts)]
    y_ref.append(sum(wt_tk[:, j, None] * np.stack(h)[e_tk[:, j], np.arange(len(x_td))]
                     for j in range(k)))
  y_err = float(np.max(np.abs(np.asarray(y).reshape(-1, cfg.hidden_size)
                              - np.concatenate(y_ref)))) / float(np.max(np.abs(y_ref)))
  return {"got": int(got), "want": want, "y_err": y_err}


def bad_case(what: str) -> str:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from moedistill import sharding
  from moedistill.errors import ConfigError
  cfg = _cfg()
  if what == "experts":
    import dataclasses
    cfg = dataclasses.replace(cfg, num_experts=6)
  block = _block(cfg, "dense", "ragged", False, ep_capacity_factor=0.5 if what == "ep" else 0.0)
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4, 1))
  rows = 6 if what == "rows" else 8
  x = jnp.zeros((rows, 4, cfg.hidden_size))
  graphdef, state = nnx.split(block)
  try:
    with jax.set_mesh(mesh):
      jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x)
  except ConfigError as e:
    return str(e)
  return "no error"


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: sharded_step_check
  from moedistill.model import gmm
  gmm.LIVE_CHUNK_ROWS = 8  # one 8-row tile per chunk: every receive tile's skip is decided
  out = {}
  for spec in sys.argv[1:]:
    kind, *args = spec.split(":")
    if kind == "layer":
      out[spec] = layer_case(args[0], args[1], args[2], args[3] == "uneven", *args[4:])
    elif kind == "step":
      out[spec] = step_case(args[0])
    elif kind == "drops":
      out[spec] = drops_case(args[0])
    elif kind == "bounded":
      out[spec] = bounded_case(args[0])
    else:
      out[spec] = bad_case(args[0])
  print(json.dumps(out))


# ------------------------------------------------------------------------------ the tests
def _run(*specs):
  r = subprocess.run([sys.executable, __file__, *specs], capture_output=True, text=True,
                     timeout=1200, env=dict(os.environ, PYTHONPATH=str(
                         pathlib.Path(__file__).resolve().parents[2])))
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


LAYER_SPECS = ([f"layer:{m}:dense:ragged:uneven" for m in MESHES]
               + [f"layer:{m}:core:ragged:even" for m in MESHES]
               + ["layer:1,1,8,1:dense:sorted:uneven", "layer:1,1,4,2:core:sorted:uneven",
                  "layer:2,1,4,1:core:ragged_vjp:uneven", "layer:1,1,4,2:dense:capacity:even",
                  "layer:1,1,8,1:dense:capacity:uneven"])


@pytest.fixture(scope="module")
def layer_results():
  return _run(*LAYER_SPECS)


@pytest.mark.parametrize("spec", LAYER_SPECS)
def test_layer_matches_one_device(layer_results, spec):
  r = layer_results[spec]
  tol = 1e-5  # relative to the largest element: float32 sums in another order, nothing more
  for k in ("y", "logits", "dx"):
    assert r[k] <= tol * r["scale"][k], (k, r)
  for k, v in r["dW"].items():
    assert r["dW_scale"][k] > 0 and v <= tol * r["dW_scale"][k], (k, r)
  assert r["dropped"][0] == r["dropped"][1], r
  if ":capacity:" not in spec:
    assert r["dropped"] == [0, 0]  # dropless
  if ":uneven" in spec:
    assert r["top_share"] >= 0.9, r  # expert 5 takes (nearly) every token
  expert_axis = int(spec.split(":")[1].split(",")[2])
  assert (r["all_to_all"] > 0) == (expert_axis > 1), r  # tokens travel only with expert > 1


def test_train_step_matches_one_device():
  out = _run("step:1,1,1,1", "step:2,1,4,1")
  a, b = out["step:1,1,1,1"], out["step:2,1,4,1"]
  assert a["ep_layers"] == 0 and b["ep_layers"] == 2  # 3 layers, layer 1 is a dense MLP
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
  assert np.abs(np.asarray(a["grads"]["lm_head.kernel"])).max() > 0
  for k in a["grads"]:
    # The gradients themselves, not params after a step (an SGD step at lr 1e-2 compared at
    # atol 5e-5 let gradient errors of 5e-3 pass). Float32 sums in another order differ by
    # ~5e-7 of a param's largest gradient entry (measured: at most 7e-7); a lost or doubled
    # shard's contribution differs by the size of the entries themselves.
    ga, gb = np.asarray(a["grads"][k]), np.asarray(b["grads"][k])
    assert np.abs(gb - ga).max() <= 1e-5 * np.abs(ga).max(), k


def test_capacity_drops_counted_per_shard():
  out = _run("drops:1,1,8,1", "drops:2,1,4,1", "bounded:1,1,8,1", "bounded:2,1,4,1")
  for r in out.values():
    assert r["want"] > 0 and r["got"] == r["want"], out
    assert r.get("y_err", 0.0) < 1e-5, out  # dropped copies add nothing, the rest are exact


def test_ragged_all_to_all_transport_offsets():
  """The GPU/TPU transport (ragged_all_to_all with exchanged offsets), emulated on CPU."""
  specs = ["layer:1,1,8,1:dense:ragged:uneven:ragged", "layer:2,1,4,1:core:sorted:even:ragged"]
  out = _run(*specs)
  for spec in specs:
    test_layer_matches_one_device(out, spec)


def test_bad_layouts_refused_before_compiling():
  out = _run("bad:experts", "bad:rows", "bad:ep")
  assert out["bad:ep"].startswith("ep_capacity_factor=0.5: expected 0 (dropless) or >= 1")
  assert out["bad:experts"] == "mesh.expert=4: expected a divisor of num_experts=6"
  assert out["bad:rows"].startswith("MoE batch of 6 rows: expected a multiple of the mesh's 8")


def test_config_ep_capacity_factor_below_one_refused():
  import importlib.util
  from moedistill.config import job_from_config
  from moedistill.errors import ConfigError
  spec = importlib.util.spec_from_file_location(
      "two_stage", pathlib.Path(__file__).resolve().parents[2] / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert job_from_config(c).model.ep_capacity_factor == 0.0  # default: dropless
  c.model.ep_capacity_factor = 0.5
  with pytest.raises(ConfigError, match=r"^config.model.ep_capacity_factor=0.5: expected 0 "):
    job_from_config(c)


def test_live_tiles_match_dense_and_skip_the_rest(monkeypatch):
  """gmm.tiled_matmul_live with a run-time tile count: live chunks equal a plain per-row dense
  product (value, dx, dW); the chunks past it are really skipped (their rows are not zero, their
  outputs are), and their rows get no gradient."""
  import jax
  import jax.numpy as jnp
  from moedistill.model import gmm
  monkeypatch.setattr(gmm, "LIVE_CHUNK_ROWS", 8)  # tiles of 4 rows: chunks of 2 tiles
  r = np.random.RandomState(0)
  n, tile, e, d, f = 7, 4, 3, 5, 6
  x = jnp.asarray(r.randn(n * tile, d), jnp.float32)
  w = jnp.asarray(r.randn(e, d, f), jnp.float32)
  te = jnp.asarray([0, 0, 1, 2, 2, 1, 0], jnp.int32)  # the last tiles: empty on device, not here
  ct = jnp.asarray(r.randn(n * tile, f), jnp.float32)
  e_r = jnp.repeat(te, tile)

  def dense(x, w, keep_rows):
    y = jnp.einsum("rd,rdf->rf", x, w[e_r])
    return jnp.where(jnp.arange(n * tile)[:, None] < keep_rows, y, 0.0)

  live_fn = jax.jit(lambda x, w, live: gmm.tiled_matmul_live(x, w, te, live))
  for live, keep_tiles in ((4, 4), (3, 4), (7, 7), (0, 0)):  # whole chunks of 2 tiles
    y = live_fn(x, w, live)
    want = dense(x, w, keep_tiles * tile)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x, w: jnp.sum(live_fn(x, w, live) * ct), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(dense(x, w, keep_tiles * tile) * ct),
                     argnums=(0, 1))(x, w)
    np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-5)
    if keep_tiles < n:
      assert float(jnp.abs(x[keep_tiles * tile:]).max()) > 0  # the skip is what zeroes them
  assert "conditional" in live_fn.lower(x, w, 3).compile().as_text()  # decided at run time
