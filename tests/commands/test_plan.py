"""moedistill.plan: AOT compiles of train's programs with abstract inputs on 8 forced CPU
devices (the embedded teacher's config.json, no weights read), honest per-device accounting,
collective bytes, and one-line refusals (plan and train) before any weight is read."""
import json
import math

import numpy as np
import pytest

from conftest import job_config, run_cli, write_config_file

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

FSDP8 = ("--devices=8", "--config=configs/two_stage.py", "--config.mesh.data=1",
         "--config.mesh.fsdp=8", "--config.data.seq_len=32")
ALL = {"cache_forward", "compress_gate", "compress_up", "compress_down", "train_wrappers",
       "train_all", "eval", "export"}


@pytest.fixture(scope="session")
def fsdp8_plan():
  r = run_cli("moedistill.plan", *FSDP8)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


def _student_bytes():
  """Total f32 bytes of the demo student's params, of its 1-D params (norm scales: kept
  replicated), and of each stage's trainable params (Adam keeps two moments of each)."""
  from moedistill.config import job_from_config
  from moedistill.model.config import ModelConfig
  from moedistill.model.shared_core import Compression
  from moedistill.training import optim, param_tree as P
  import importlib.util
  spec = importlib.util.spec_from_file_location("two_stage", "configs/two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  job = job_from_config(mod.get_config())
  cfg = ModelConfig.from_json_file(f"{job.teacher}/config.json")
  shapes = P.shapes(P.abstract_student(cfg, Compression(*job.ranks)))
  size = {k: 4 * math.prod(s) for k, s in shapes.items()}
  trainable = {}
  for st in job.train.stages:
    _, paths, _ = optim.build(st, job.train, shapes, 1)
    trainable[st.name] = sum(size[k] for k in paths)
  vectors = sum(v for k, v in size.items() if len(shapes[k]) == 1)
  return sum(size.values()), vectors, trainable


def test_plan_fsdp8_figures_and_honest_accounting(fsdp8_plan):
  stdout, out = fsdp8_plan
  assert out["fits"] is True and out["device_memory"] == 80 * 2**30
  assert set(out["programs"]) == ALL
  for name, r in out["programs"].items():
    assert name in stdout  # one human-readable line per program before the JSON
    assert r["bytes_per_device"] > 0 and r["flops_per_device"] > 0 and r["compile_s"] > 0, name
    # every program reads fsdp-sharded params, so each one moves bytes between devices
    assert r["collective_bytes_per_device"] > 0, name
  total, vectors, trainable = _student_bytes()
  for stage, tr in trainable.items():
    r = out["programs"][f"train_{stage}"]
    # every matrix of the student is split over fsdp=8 (wrapper factors included); only
    # the norm vectors stay whole on each device
    assert total / 8 <= r["params_bytes"] <= total / 8 + vectors, (stage, r)
    assert r["opt_state_bytes"] >= 2 * tr / 8, (stage, r)
    assert r["bytes_per_device"] >= (total + 2 * tr) / 8, (stage, r)
    # fsdp gathers params for the forward and reduce-scatters gradients
    assert r["collective_bytes_per_device"] >= total / 8, (stage, r)


def test_check_names_program_overshoot_and_knobs(fsdp8_plan):
  from moedistill import plan
  from moedistill.config import job_from_config
  from moedistill.errors import UserError
  import importlib.util
  spec = importlib.util.spec_from_file_location("two_stage", "configs/two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  job = job_from_config(mod.get_config())
  _, out = fsdp8_plan
  train = out["programs"]["train_all"]["bytes_per_device"]
  others = max(r["bytes_per_device"] for n, r in out["programs"].items() if n != "train_all")
  assert train > others  # the demo's largest program is the last stage's train step
  result = {**out, "device_memory": others}  # all but train_all fit
  with pytest.raises(UserError, match=r"plan: train_all needs .* GiB per device, .* GiB "
                     r"over .*micro_batches \(now 1\).*remat.*config\.mesh"):
    plan.check(result, job)
  plan.check({**out, "device_memory": train}, job)  # exactly enough fits


def test_a_sample_program_that_does_not_fit_names_the_batch():
  """The on-policy decode prefills a step's rows at once: fewer rows is its knob."""
  from moedistill import plan
  from moedistill.config import job_from_config
  from moedistill.errors import UserError
  import importlib.util
  spec = importlib.util.spec_from_file_location("two_stage", "configs/two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  job = job_from_config(mod.get_config("on_policy"))
  result = {"device_memory": 2**30, "programs": {"sample_on_policy": {"bytes_per_device": 2**31}}}
  with pytest.raises(UserError, match=r"plan: sample_on_policy needs 2\.00 GiB per device, 1\.00 "
                     rf"GiB over .*config\.train\.batch_size \(now {job.train.batch_size}; "
                     r"the decode is not micro-batched\)"):
    plan.check(result, job)


def test_collective_bytes_from_compiled_hlo():
  from moedistill.hlo_cost import collective_bytes, collective_traffic
  from moedistill.plan import parse_bytes
  hlo = ("  %p = f32[4,16]{1,0} parameter(0)\n"
         "  %all-gather = f32[32,16]{1,0} all-gather(%p), channel_id=1, dimensions={0}\n"
         "  %t = (bf16[8]{0}, s32[2]{0}) tuple(%a, %b)\n"
         "  ROOT %ar = bf16[8]{0} all-reduce-start(%t), channel_id=2, to_apply=%add\n"
         "  %d = f32[4]{0} all-reduce-done(%ar)\n")
  assert collective_bytes(hlo) == 4 * 16 * 4 + (8 * 2 + 2 * 4)
  # received per device: an all-gather's operand is one shard of the 8 (iota groups [1, 8]); an
  # all-reduce moves its operand twice, less the own share (explicit groups of 2)
  traffic = collective_traffic(hlo.replace("dimensions", "replica_groups=[1,8]<=[8], dims")
                               .replace("to_apply", "replica_groups={{0,1},{2,3}}, to_apply"), 8)
  assert traffic["all-gather"] == 7 * 4 * 16 * 4
  assert traffic["all-reduce"] == (8 * 2 + 2 * 4) and traffic["all-to-all"] == 0
  assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000
  assert parse_bytes("4096") == 4096


def test_plan_refuses_a_program_that_does_not_fit():
  r = run_cli("moedistill.plan", *FSDP8, "--programs=export", "--device_memory=1KiB")
  assert r.returncode == 2, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["fits"] is False and set(out["programs"]) == {"export"}
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: plan: export needs "), r.stderr
  assert "over device_memory=0.00 GiB" in lines[0] and "config.mesh" in lines[0]


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.tensor=8", "config.mesh.tensor=8 does not divide the model's "
     "num_attention_heads=4"),
    ("--config.mesh.fsdp=3", "8 devices are not divisible by 3"),
    ("--config.mesh.tensor=4", "config.mesh.tensor=4 does not divide the model's "
     "num_key_value_heads=2"),
])
def test_plan_refuses_a_mesh_that_does_not_divide(override, message):
  r = run_cli("moedistill.plan", "--devices=8", "--config=configs/two_stage.py", override)
  assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
  assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_train_refuses_before_reading_weights(tmp_path, teacher_dir):
  path, _ = teacher_dir
  config = write_config_file(tmp_path, job_config(tmp_path, path))
  r = run_cli("moedistill.train", f"--config={config}", "--device_memory=1KiB")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().startswith("error: plan: cache_forward needs "), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()  # nothing written, no weights read
  np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()),
                          sorted(["teacher", "train.jsonl", "eval.jsonl", "job_config.py",
                                  "job_config.py.json"]))


def _train_plan(data, fsdp, expert, env=None):
  r = run_cli("moedistill.plan", f"--devices={data * fsdp * expert}",
              "--config=configs/two_stage.py", "--programs=train", "--config.stage_order=all",
              "--config.model.moe_backend=capacity", "--config.data.seq_len=32",
              f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
              f"--config.mesh.expert={expert}", env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])["programs"]["train_all"]


def test_train_step_flops_divide_over_8_devices():
  """The whole train step (unscanned, one micro-batch: XLA counts a loop body once) on 8 forced
  devices does at most 1.25x (one device's FLOPs / 8) per device on data=8, fsdp=8, expert=8;
  without expert parallelism data=8 leaves each device the whole batch's MoE work. On one
  device the step has no collectives; on each 8-device mesh it has some (gradients are
  reduced over the batch shards)."""
  one = _train_plan(1, 1, 1)
  assert one["collective_bytes_per_device"] == 0
  ideal = one["flops_per_device"] / 8
  for mesh in ((8, 1, 1), (1, 8, 1), (1, 1, 8)):
    r = _train_plan(*mesh)
    assert r["flops_per_device"] <= 1.25 * ideal, mesh
    assert r["collective_bytes_per_device"] > 0, mesh
