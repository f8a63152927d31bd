"""Cross-lowering from this CPU-only machine: the demo's teacher cache forward and train step
lowered for CUDA (`plan --platform=cuda`), with `auto` resolved for an H100, not for the host."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _demo_config(workdir):
  spec = importlib.util.spec_from_file_location("two_stage", ROOT / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.workdir = str(workdir)
  c.stage_order = "all"  # one stage's step: the other differs only in what is frozen
  return c


def test_demo_cache_forward_and_train_step_lower_for_cuda(tmp_path):
  from moedistill import plan, sharding
  from moedistill.config import job_from_config
  from moedistill.model import pallas_gmm, resolve
  h100 = resolve.Target("cuda", "NVIDIA H100 80GB HBM3")
  with resolve.targeting(h100), pallas_gmm.triton_lowering():
    job = job_from_config(_demo_config(tmp_path))
    out = plan.cross_lower(job, sharding.make_mesh(job.mesh), ("cache_forward", "train"),
                           show=False)
  assert (out["platform"], out["device_kind"]) == ("cuda", h100.device_kind)
  # For the target: bf16 compute (CPU would be f32) and the Pallas paths. The demo's shapes
  # (d=64, f=64, rank 4) miss the Mosaic GPU blocks, so even on Hopper it is not mgpu.
  for model in ("teacher", "student"):
    rt = out["runtime"][model]
    assert (rt["dtype"], rt["moe_backend"], rt["attention"]) == ("bfloat16", "pallas", "pallas")
  assert sorted(out["programs"]) == ["cache_forward", "train_all"]
  for name, r in out["programs"].items():
    assert r["lowered"], (name, r)
    # The Pallas kernels are in the program as Triton custom calls, not interpret-mode loops.
    assert "__gpu$xla.gpu.triton" in r["custom_calls"], (name, r)


def test_cli_refuses_an_unknown_platform(tmp_path):
  r = subprocess.run([sys.executable, "-m", "moedistill.plan",
                      f"--config={ROOT / 'configs' / 'two_stage.py'}", "--platform=gpu",
                      f"--config.workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "error: --platform='gpu': expected one of ['cpu', 'cuda', 'rocm', 'tpu']")


def test_error_line_names_where_a_messageless_error_was_raised():
  from moedistill.hlo_cost import error_line as _error_line

  def kernel():
    raise AttributeError()  # as jax.devices()[0].core_count on a CPU device, traced for CUDA
  try:
    kernel()
  except AttributeError as e:
    line = _error_line(e)
  at = kernel.__code__.co_firstlineno + 1
  assert line == (f"AttributeError: raised at test_plan_cuda.py:{at}: raise AttributeError()  "
                  "# as jax.devices()[0].core_count on a CPU device, traced for CUDA")
  assert _error_line(ValueError("\nfirst\nsecond")) == "ValueError: first"
