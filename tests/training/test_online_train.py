"""train.teacher_mode=online: a 2-step run of the demo config (configs/two_stage.py at tiny
size) completes with the teacher run inside the step, and its first step's logged loss equals
a direct float64 computation, L = (1-alpha) CE + alpha T^2 KL(p_T^teacher || p_T^student)
over the whole vocabulary, from dense logits of the zero-shot student and the teacher on the
first batch. The stage temperature (1.5) is not cached: online KD needs no cached logsumexp.
`plan` compiles the online step with the teacher's params as an input; a bad teacher_mode is
one line naming the field."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import job_config, make_hf_checkpoint, make_tokenizer

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

ALPHA, T = 0.6, 1.5


def online_config(tmp):
  c = job_config(tmp, tmp / "teacher", **{"train.teacher_mode": "online"})
  c.stages.wrappers.steps = 1
  c.stages.all.steps = 1
  c.train.batch_size = 4
  c.train.log_every = 1
  c.train.alpha = ALPHA
  c.train.temperature = T
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from moedistill.config import job_from_config
  from moedistill.train import train
  tmp = tmp_path_factory.mktemp("online")
  make_hf_checkpoint(tmp / "teacher", vocab_size=64)
  make_tokenizer(tmp / "teacher")
  job = job_from_config(online_config(tmp))
  export = train(job, progress=False)
  return tmp, job, export


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_two_step_online_run_and_first_loss(run):
  import jax.numpy as jnp
  from moedistill.data.cache import CacheReader
  from moedistill.data.loader import Loader
  from moedistill.hub import hf
  tmp, job, export = run
  assert (export / "model.safetensors").exists()
  rows = [json.loads(line) for line in (Path(job.workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["global_step"] for r in rows] == [1, 2]
  first = rows[0]

  reader = CacheReader(job.cache_path("train"))
  assert T not in reader.meta["temperatures"]
  loader = Loader(reader, job.train.batch_size, job.seed, 0, 1, job.cache.shuffle_chunks,
                  job.cache.prefetch, 1)
  batch = loader.batch(0)
  tokens, segs = batch["tokens"], batch["segment_ids"]
  logits = {}
  for name, path in (("s", job.student_init), ("t", job.teacher)):
    model, _ = hf.load_model(path, job.model)
    z, _ = model(jnp.asarray(tokens), jnp.asarray(segs))
    logits[name] = np.asarray(z, np.float64)
  valid = np.zeros(tokens.shape, bool)
  valid[:, :-1] = (segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)
  labels = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  ls1 = log_softmax(logits["s"])
  ce = -np.take_along_axis(ls1, labels[..., None], -1)[..., 0]
  logp, logq = log_softmax(logits["t"] / T), log_softmax(logits["s"] / T)
  kl = (np.exp(logp) * (logp - logq)).sum(-1)
  total = (1 - ALPHA) * ce + ALPHA * T ** 2 * kl
  np.testing.assert_allclose(first["ce"], ce[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(first["kl"], kl[valid].mean(), rtol=1e-4)
  np.testing.assert_allclose(first["kd_total"], total[valid].mean(), rtol=1e-5)
  agree = logits["s"].argmax(-1) == logits["t"].argmax(-1)
  np.testing.assert_allclose(first["top1_agreement"], agree[valid].mean(), atol=1e-6)
  # the step's loss adds the router aux term to the KD total
  coef = json.loads((Path(job.teacher) / "config.json").read_text())["router_aux_loss_coef"]
  np.testing.assert_allclose(first["loss"], first["kd_total"] + coef * first["router_aux"],
                             rtol=1e-5)
  assert rows[1]["kl"] != first["kl"]  # the second step saw updated params


def test_plan_accepts_online_and_counts_the_teacher(tmp_path):
  from moedistill import plan, sharding
  from moedistill.config import job_from_config
  make_hf_checkpoint(tmp_path / "teacher", vocab_size=64)  # plan reads only its config.json
  c = online_config(tmp_path)
  mesh = sharding.make_mesh(job_from_config(c).mesh)
  got = {}
  for mode in ("cache", "online"):
    c.train.teacher_mode = mode
    job = job_from_config(c)
    got[mode] = plan.plan(job, mesh, 80 * 2**30, ["train"], show=False)["programs"]
  from moedistill.abstract_programs import abstract_model
  from moedistill.hlo_cost import device_bytes
  from moedistill.model.config import ModelConfig
  cfg = ModelConfig.from_json_file(tmp_path / "teacher" / "config.json")
  _, _, teacher = abstract_model(cfg, job.model, None, mesh)
  t_bytes = device_bytes(teacher)
  assert t_bytes > 0 and set(got["online"]) == {"train_wrappers", "train_all"}
  for name, r in got["online"].items():
    assert r["params_bytes"] == got["cache"][name]["params_bytes"] + t_bytes
    # the teacher's params are arguments of the online step (both models resident): the
    # non-temporary bytes (arguments + outputs - donated) hold both models' params and the
    # Adam state (the cached top-k of the batch, unused online, are pruned by jit)
    assert r["bytes_per_device"] - r["temp_bytes"] >= \
        r["params_bytes"] + r["opt_state_bytes"], (name, r)


def test_bad_teacher_mode_is_one_line(tmp_path):
  from moedistill.config import job_from_config
  from moedistill.errors import ConfigError
  make_hf_checkpoint(tmp_path / "teacher", vocab_size=64)
  c = online_config(tmp_path)
  c.train.teacher_mode = "live"
  with pytest.raises(ConfigError) as e:
    job_from_config(c)
  assert str(e.value) == "config.train.teacher_mode='live': expected one of ['cache', 'online']"


def test_sweep_trains_online_points_one_by_one(tmp_path):
  """The batched sweep vmaps students only: online points are trained one by one (auto) and
  --sweep.batched=on is refused naming the field."""
  from moedistill import sharding
  from moedistill.config import job_from_config
  from moedistill.errors import UserError
  from moedistill.sweep import batched_allowed
  make_hf_checkpoint(tmp_path / "teacher", vocab_size=64)
  job = job_from_config(online_config(tmp_path))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=sharding.jax.devices()[:1])
  assert batched_allowed("auto", job, mesh) is False
  with pytest.raises(UserError, match="config.train.teacher_mode=online"):
    batched_allowed("on", job, mesh)
  c = online_config(tmp_path)
  c.train.teacher_mode = "cache"
  assert batched_allowed("auto", job_from_config(c), mesh) is True


def test_online_step_gradient_equals_dense_autodiff(tmp_path):
  """The whole online micro-batch loss (fused CE + fused full-vocab KL) has the gradient of
  the same loss written densely ([tokens x vocab] logits from a plain forward, jax autodiff),
  for every student param; the teacher gets none."""
  import jax
  import jax.numpy as jnp
  from moedistill.hub import hf
  from moedistill.model.layers import Runtime
  from moedistill.training import param_tree as P
  from moedistill.training.train_step import StepConfig, labels_and_mask, micro_loss
  make_hf_checkpoint(tmp_path / "s", seed=1, vocab_size=64)
  make_hf_checkpoint(tmp_path / "t", seed=2, vocab_size=64)
  student, _ = hf.load_model(tmp_path / "s", Runtime())
  teacher, _ = hf.load_model(tmp_path / "t", Runtime())
  r = np.random.RandomState(0)
  tokens = jnp.asarray(r.randint(0, 64, (2, 12)), jnp.int32)
  segs = jnp.asarray([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], jnp.int32)
  batch = {"tokens": tokens, "segment_ids": segs}
  sc = StepConfig(alpha=ALPHA, temperature=T, mode="bucket", t_index=None, vocab_chunk=24,
                  micro_batches=1, aux_coef=0.0, top_k=2, online=True)
  g, tmpl, params = P.split(student)
  labels, mask = labels_and_mask(tokens, segs)
  n_valid = jnp.sum(mask.astype(jnp.float32))

  def fused(p):
    return micro_loss(P.merge(g, tmpl, p), batch, n_valid, sc, teacher)[0]

  def dense(p):
    zs, _ = P.merge(g, tmpl, p)(tokens, segs)
    zt, _ = teacher(tokens, segs)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(zs), labels[..., None], -1)[..., 0]
    logp, logq = jax.nn.log_softmax(zt / T), jax.nn.log_softmax(zs / T)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
    total = (1 - ALPHA) * ce + ALPHA * T ** 2 * kl
    return jnp.sum(jnp.where(mask, total, 0.0)) / n_valid

  (lf, gf), (ld, gd) = jax.value_and_grad(fused)(params), jax.value_and_grad(dense)(params)
  np.testing.assert_allclose(lf, ld, rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(np.asarray(gf[k]), np.asarray(gd[k]), rtol=1e-3,
                               atol=1e-6 * float(jnp.max(jnp.abs(gd[k]))) + 1e-9, err_msg=k)
  assert any(float(jnp.max(jnp.abs(gd[k]))) > 0 for k in params)


def test_online_step_micro_batches_equal_one_batch(tmp_path):
  """Two micro-batches of the online step give the one-batch step's update and metrics (the
  teacher's params reach every micro-batch)."""
  import jax
  import jax.numpy as jnp
  import optax
  from moedistill.hub import hf
  from moedistill.model.layers import Runtime
  from moedistill.training import param_tree as P
  from moedistill.training.train_step import StepConfig, make_train_step
  make_hf_checkpoint(tmp_path / "s", seed=1, vocab_size=64)
  make_hf_checkpoint(tmp_path / "t", seed=2, vocab_size=64)
  g, tmpl, params = P.split(hf.load_model(tmp_path / "s", Runtime())[0])
  tg, ttmpl, tparams = P.split(hf.load_model(tmp_path / "t", Runtime())[0])
  r = np.random.RandomState(0)
  batch = {"tokens": jnp.asarray(r.randint(0, 64, (4, 10)), jnp.int32),
           "segment_ids": jnp.asarray([[1] * 10, [1] * 6 + [2] * 4, [1] * 8 + [0] * 2,
                                       [3] * 10], jnp.int32)}
  tx = optax.sgd(0.1)
  out = {}
  for m in (1, 2):
    sc = StepConfig(alpha=ALPHA, temperature=T, mode="bucket", t_index=None, vocab_chunk=24,
                    micro_batches=m, aux_coef=0.0, top_k=2, online=True)
    step = jax.jit(make_train_step(g, tmpl, tx, sc, (tg, ttmpl)))
    out[m] = step(params, {}, tx.init(params), batch, tparams)
  for k in params:
    np.testing.assert_allclose(np.asarray(out[2][0][k]), np.asarray(out[1][0][k]), rtol=1e-5,
                               atol=1e-6, err_msg=k)
  for k in ("kd_total", "kl", "ce", "top1_agreement"):
    np.testing.assert_allclose(float(out[2][2][k]), float(out[1][2][k]), rtol=1e-5)
  assert any(not np.array_equal(np.asarray(out[1][0][k]), np.asarray(params[k])) for k in params)
