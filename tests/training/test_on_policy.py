"""stages.<name>.kind=on_policy (training/on_policy.py) on the tiny test teacher, seq 16:
the first on-policy step's logged loss is the float64 reverse KL of the zero-shot student's
own samples; the stage lowers the held-out reverse KL to the teacher on the student's own
samples from where it started; a run killed (SIGKILL) inside an on-policy stage and rerun
exports bit-identical weights; bad on-policy fields are one line naming the field."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import job_config, make_hf_checkpoint, make_tokenizer, write_config_file

NEW = 8  # max_new_tokens: prompts get 16 - 8 slots


def _stage(steps, groups, **kw):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "two_stage", Path(__file__).resolve().parents[2] / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod._stage(steps, groups, **kw)


def on_policy_config(tmp, teacher, order="op", op_steps=6, **op):
  c = job_config(tmp, teacher)
  c.stage_order = order
  c.stages.wrappers.steps = 2
  c.stages.op = _stage(op_steps, [(".*embed.*", 0.0), (".*", 1.0)], kind="on_policy",
                       max_new_tokens=NEW, warmup_steps=0, **op)
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.schedule = "constant"
  c.train.lr = 1e-3
  return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("op_teacher")
  # initializer_range 0.4 (conftest's default 0.1 gives near-uniform next-token distributions,
  # a zero-shot reverse KL of ~0.003 nats, below the router aux term's ~0.002 in the loss):
  # sharper distributions, a zero-shot held-out reverse KL of ~1.3 nats, a signal to lower.
  make_hf_checkpoint(tmp / "teacher", vocab_size=64, initializer_range=0.4)
  make_tokenizer(tmp / "teacher")
  return tmp / "teacher"


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reverse_kl64(student, teacher, rows):
  """Per-position float64 KL(q_student || p_teacher) [b, l] from dense logits over the
  whole vocabulary, and the mask of positions that predict a generated token."""
  import jax.numpy as jnp
  z = {}
  for name, m in (("s", student), ("t", teacher)):
    logits, _ = m(jnp.asarray(rows["tokens"]), jnp.asarray(rows["segment_ids"]))
    z[name] = np.asarray(logits, np.float64)
  logq, logp = log_softmax(z["s"]), log_softmax(z["t"])
  return (np.exp(logq) * (logq - logp)).sum(-1), np.asarray(rows["loss_mask"])


def sampler(model, eos):
  """(batch, key) -> the rows on_policy.sample_batch makes with `model` (one compile)."""
  import jax
  import jax.numpy as jnp
  from moedistill.training import on_policy
  fn = jax.jit(lambda tok, seg, k: on_policy.sample_batch(model, tok, seg, k, NEW,
                                                           eos_ids=eos))
  return lambda batch, key: {k: np.asarray(v) for k, v in fn(
      jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]), key).items()}


def own_samples(model, batch, key, eos):
  return sampler(model, eos)(batch, key)


@pytest.fixture(scope="module")
def op_run(tmp_path_factory, teacher):
  """One on-policy stage (lmbda 1, reverse KL) from the zero-shot student."""
  from moedistill.config import job_from_config
  from moedistill.train import train
  tmp = tmp_path_factory.mktemp("op_run")
  job = job_from_config(on_policy_config(tmp, teacher, op_steps=24))
  t0 = time.time()
  export = train(job, progress=False)
  print(f"on-policy run: {time.time() - t0:.0f}s")
  return job, export


@pytest.mark.slow
def test_first_step_loss_is_the_reverse_kl_of_own_samples(op_run):
  import json
  from moedistill.data.cache import CacheReader
  from moedistill.data.loader import Loader
  from moedistill.hub import hf
  from moedistill.training import on_policy
  job, _ = op_run
  first = json.loads((Path(job.workdir) / "metrics.jsonl").read_text().splitlines()[0])
  assert first["on_policy"] == 1.0 and first["global_step"] == 1
  reader = CacheReader(job.cache_path("train"))
  batch = Loader(reader, job.train.batch_size, job.seed, 0, 1, job.cache.shuffle_chunks,
                 job.cache.prefetch, 1).batch(0)
  student, cfg = hf.load_model(job.student_init, job.model)
  t_model, _ = hf.load_model(job.teacher, job.model)
  rows = own_samples(student, batch, on_policy.step_key(job.seed, 0),
                     on_policy.eos_of(job, cfg))
  kl, mask = reverse_kl64(student, t_model, rows)
  assert mask.sum() == first["tokens"] > 0
  np.testing.assert_allclose(first["kl"], kl[mask].mean(), rtol=1e-4)
  # the mask covers exactly the sampled tokens: each row's prompt is a prefix of its cache row
  for i in range(len(mask)):
    pos = np.flatnonzero(mask[i])
    cut = pos[0] + 1
    np.testing.assert_array_equal(rows["tokens"][i, :cut], batch["tokens"][i, :cut])
    assert pos[-1] + 2 == rows["segment_ids"][i].sum() and len(pos) == rows["new"][i]


@pytest.mark.slow
def test_on_policy_stage_lowers_held_out_reverse_kl_on_own_samples(op_run):
  import jax
  from moedistill.data.cache import CacheReader
  from moedistill.data.loader import Loader
  from moedistill.hub import hf
  from moedistill.training import on_policy
  job, export = op_run
  reader = CacheReader(job.cache_path("eval"))  # held-out rows, never trained on
  batch = Loader(reader, 16, job.seed, 0, 1, 1, 1, 1).batch(0)
  t_model, _ = hf.load_model(job.teacher, job.model)
  got = {}
  for name, path in (("start", job.student_init), ("end", export)):
    model, cfg = hf.load_model(path, job.model)
    sample, kls = sampler(model, on_policy.eos_of(job, cfg)), []
    for r in range(4):  # the same 4 keys for both students: their own samples
      rows = sample(batch, jax.random.PRNGKey(1000 + r))
      kl, mask = reverse_kl64(model, t_model, rows)
      kls.append(kl[mask])
    got[name] = float(np.concatenate(kls).mean())
  print(f"held-out reverse KL on own samples: {got}")
  assert got["end"] < 0.9 * got["start"], got


def _run_until(cfg, ckpt_dir, step):
  p = subprocess.Popen([sys.executable, "-m", "moedistill.train", f"--config={cfg}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  while p.poll() is None and not (ckpt_dir / str(step)).exists():
    time.sleep(0.05)
  assert p.poll() is None, f"finished before checkpoint {step}: {p.stderr.read()[-2000:]}"
  p.send_signal(signal.SIGKILL)
  p.communicate(timeout=120)
  return p.returncode


@pytest.mark.slow
def test_sigkill_inside_on_policy_stage_resumes_bit_identical(tmp_path, teacher, capsys):
  """wrappers (2 offline steps), then an on-policy stage of 6 steps with lmbda 0.5 (both
  kinds of steps); killed after its checkpoints at global steps 4 and 6, then rerun."""
  from moedistill.config import job_from_config
  from moedistill.hub import safetensors_io as st
  from moedistill.train import train
  from moedistill.training import on_policy

  def config(where):
    where.mkdir(exist_ok=True)
    c = on_policy_config(where, teacher, order="wrappers,op", op_steps=6, lmbda=0.5)
    c.train.batch_size = 4
    c.train.checkpoint_every = 1
    c.train.keep = 10
    return c

  ref = job_from_config(config(tmp_path / "ref"))
  kinds = [on_policy.is_on_policy(ref.seed, g, 0.5) for g in range(2, 8)]
  assert any(kinds) and not all(kinds), kinds  # both kinds around the kill points
  ref_export = train(ref, progress=False)
  c = config(tmp_path / "killed")
  c.cache.path, c.student.init_from = ref.cache.path, ref.student_init  # built once
  cfg = write_config_file(tmp_path, c)
  ckpt = Path(c.workdir) / "checkpoints"
  for step in (4, 6):
    assert _run_until(cfg, ckpt, step) == -signal.SIGKILL
  capsys.readouterr()
  export = train(job_from_config(c), progress=False)
  assert "resumed from" in capsys.readouterr().out
  got = st.SafetensorsFile(export / "model.safetensors")
  want = st.SafetensorsFile(ref_export / "model.safetensors")
  assert sorted(got.keys()) == sorted(want.keys())
  for k in want.keys():
    assert np.array_equal(np.asarray(got.get(k)), np.asarray(want.get(k))), k


@pytest.mark.parametrize("field,value,expected", [
    ("kind", "onpolicy", "config.stages.op.kind='onpolicy': expected one of"),
    ("beta", 1.5, "config.stages.op.beta=1.5: expected a value in [0, 1]"),
    ("beta", -0.1, "config.stages.op.beta=-0.1: expected a value in [0, 1]"),
    ("lmbda", 2.0, "config.stages.op.lmbda=2.0: expected a value in [0, 1]"),
    ("max_new_tokens", 0, "config.stages.op.max_new_tokens=0: expected a positive integer"),
    ("max_new_tokens", 16, "config.stages.op.max_new_tokens=16: expected < "
                           "config.data.seq_len=16"),
    ("sample_temperature", 0.0, "config.stages.op.sample_temperature=0.0: expected > 0"),
    ("teacher", "", "config.teacher='': config.stages.op.kind=on_policy needs the teacher"),
])
def test_bad_on_policy_fields_are_one_line(tmp_path, field, value, expected):
  from moedistill.config import job_from_config
  from moedistill.errors import ConfigError
  c = on_policy_config(tmp_path, tmp_path / "teacher")
  if field == "teacher":
    c.teacher = value
  else:
    c.stages.op[field] = value
  with pytest.raises(ConfigError) as e:
    job_from_config(c)
  msg = str(e.value)
  assert msg.startswith(expected) and "\n" not in msg, msg


def test_offline_stage_refuses_max_new_tokens_and_defaults_stay_offline(tmp_path):
  from moedistill.config import job_from_config
  from moedistill.errors import ConfigError
  c = job_config(tmp_path, tmp_path / "teacher")
  job = job_from_config(c)
  assert [s.kind for s in job.train.stages] == ["offline", "offline"]
  c.stages.all.max_new_tokens = 4
  with pytest.raises(ConfigError, match=r"^config.stages.all.max_new_tokens=4: only for "
                                        r"config.stages.all.kind=on_policy$"):
    job_from_config(c)


def test_cli_refuses_bad_beta_exit_2(tmp_path):
  from conftest import run_cli
  c = on_policy_config(tmp_path, tmp_path / "teacher")
  c.stages.op.beta = 2.0
  r = run_cli("moedistill.train", f"--config={write_config_file(tmp_path, c)}", timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "config.stages.op.beta=2.0: expected a value in [0, 1]" in r.stderr


def test_on_policy_draws_are_a_pure_function_of_seed_and_step():
  from moedistill.training import on_policy
  a = [on_policy.is_on_policy(0, g, 0.3) for g in range(400)]
  assert a == [on_policy.is_on_policy(0, g, 0.3) for g in range(400)]
  assert 0.2 < np.mean(a) < 0.4
  assert a != [on_policy.is_on_policy(1, g, 0.3) for g in range(400)]
  assert not any(on_policy.is_on_policy(0, g, 0.0) for g in range(100))
  assert all(on_policy.is_on_policy(0, g, 1.0) for g in range(100))


@pytest.mark.slow
def test_plan_compiles_sample_and_score_with_both_models_resident(tmp_path):
  from moedistill import plan, sharding
  from moedistill.config import job_from_config
  make_hf_checkpoint(tmp_path / "teacher", vocab_size=64)  # plan reads only its config.json
  c = on_policy_config(tmp_path, tmp_path / "teacher", order="wrappers,op")
  job = job_from_config(c)
  mesh = sharding.make_mesh(job.mesh)
  got = plan.plan(job, mesh, 80 * 2**30, ["train"], show=False)["programs"]
  assert set(got) == {"train_wrappers", "sample_op", "score_op"}  # lmbda 1: no offline step
  from moedistill.abstract_programs import abstract_model
  from moedistill.hlo_cost import device_bytes
  cfg = plan.ModelConfig.from_json_file(tmp_path / "teacher" / "config.json")
  t_bytes = device_bytes(abstract_model(cfg, job.model, None, mesh)[2])
  for name in ("sample_op", "score_op"):
    r = got[name]
    assert r["params_bytes"] == got["train_wrappers"]["params_bytes"] + t_bytes, name
    assert r["flops_per_device"] > 0, name
  # scoring: both models' params and the Adam state are arguments; sampling: the student's
  # params are, the teacher and the Adam state stay resident beside its decode. Either way
  # the non-temporary bytes hold both models and the Adam state.
  for name in ("sample_op", "score_op"):
    r = got[name]
    assert r["bytes_per_device"] - r["temp_bytes"] >= r["params_bytes"] + r["opt_state_bytes"]
  c.stages.op.lmbda = 0.5  # offline steps too: the stage's ordinary train step is planned
  got = plan.plan(job_from_config(c), mesh, 80 * 2**30, ["train"], show=False)["programs"]
  assert set(got) == {"train_wrappers", "sample_op", "score_op", "train_op"}
