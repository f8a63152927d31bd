"""A teacher cache is never made with a backend that drops token copies: refused with one line
before any work; a dropless cache records the backend that made it in metadata.json. Held-out
evaluation refuses a dropping model the same way."""
import dataclasses

import pytest
from flax import nnx

from conftest import job_config
from moedistill.cache_logits import build_cache
from moedistill.config import job_from_config
from moedistill.data import cache
from moedistill.errors import ConfigError
from moedistill.model.config import ModelConfig
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


def test_cache_and_evaluate_refuse_capacity_and_the_cache_records_it(tmp_path, teacher_dir):
  path, _ = teacher_dir
  job = job_from_config(job_config(tmp_path, path, **{"model.moe_backend": "capacity"}))
  with pytest.raises(ConfigError) as e:
    build_cache(job, "eval", progress=False)
  assert str(e.value) == (
      "teacher cache: config.model.moe_backend='capacity' drops token copies past each "
      "expert's capacity (capacity_factor=1.25); expected a dropless backend: auto, sorted, "
      "ragged, pallas or mgpu")
  assert cache.read_metadata(job.cache_path("eval")) is None  # refused before any work
  # A teacher passed in is checked by its own runtime, whatever the config says.
  cfg = ModelConfig.from_json_file(path / "config.json")
  capacity = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime(moe_backend="capacity"))
  ok = dataclasses.replace(job, model=dataclasses.replace(job.model, moe_backend="auto"))
  with pytest.raises(ConfigError, match="^teacher cache: config.model.moe_backend='capacity'"):
    build_cache(ok, "eval", progress=False, teacher=capacity)
  # auto (sorted here) makes the cache and records what made it; a rerun finds it finished.
  out = build_cache(ok, "eval", progress=False)
  meta = cache.read_metadata(out)
  assert meta["complete"] and meta["teacher_runtime"] == {
      "moe_backend": "sorted", "attention": "auto", "dtype": "float32", "platform": "cpu",
      "device_kind": "cpu"}
  assert build_cache(ok, "eval", progress=False) == out
  # A run that trains with capacity reuses the finished exact cache (nothing to compute).
  assert build_cache(job, "eval", progress=False) == out
  # Held-out evaluation refuses a dropping model the same way, and runs an exact one.
  from moedistill.training.held_out import evaluate_model
  reader = cache.CacheReader(out)
  with pytest.raises(ConfigError, match="^evaluate: config.model.moe_backend='capacity' drops"):
    evaluate_model(capacity, reader, max_rows=4)
  exact = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=Runtime())
  assert evaluate_model(exact, reader, max_rows=4)["tokens"] > 0


def test_cache_refuses_bounded_expert_buffers(tmp_path, teacher_dir):
  from moedistill import sharding
  from moedistill.cache_logits import check_exact
  path, _ = teacher_dir
  job = job_from_config(job_config(tmp_path, path, **{"model.ep_capacity_factor": 1.5}))
  check_exact(job.model, sharding.make_mesh(job.mesh))  # mesh.expert=1: no exchange, no drop
  rt = dataclasses.replace(job.model, moe_backend="sorted")

  class Mesh:  # check_exact reads only the mesh's axis sizes
    shape = {"data": 1, "fsdp": 1, "expert": 2, "tensor": 1}
  with pytest.raises(ConfigError, match=r"^teacher cache: config.model.ep_capacity_factor=1.5 "
                     r"drops .* \(mesh.expert=2\); expected 0"):
    check_exact(rt, Mesh)
