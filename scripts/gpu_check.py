"""One-GPU check: the demo under `auto`, then each MoE backend's grouped matmul, forward and
backward, against jax.lax.ragged_dot and a dense matmul of the same FLOPs. Run by
scripts/gpu_check.sh; prints one JSON line (last line of stdout).

  bash scripts/gpu_check.sh                 # demo (2+2 steps) + grouped matmuls at 30B-A3B
  bash scripts/gpu_check.sh --skip_demo --reps=20 --backends=pallas,mgpu

Grouped matmul: Qwen3-30B-A3B's expert shape (hidden 2048 -> moe_intermediate 768, 128
experts, top-8) over 16384 tokens in bfloat16: y_td = combine(gmm(expand(x_td), w_edf)), the
dispatch seam every expert computes through (routing, row moves and the matmul), timed as one
jitted forward+backward (dx and dW). TFLOP/s counts model FLOPs, 6 * tokens * top_k * d * f
(forward 2, backward 4), whatever the backend computes (capacity's empty slots, padding).
References at the same FLOPs: `lax.ragged_dot` (the bare grouped matmul over rows already
sorted by expert, autodiff backward) and `dense` (one [tokens * top_k, d] @ [d, f] matmul).
Without an NVIDIA GPU: "no GPU" on stderr and exit status 2 (--cpu_smoke: tiny shapes on CPU,
for the test that keeps this script working where no GPU is lent).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

flags.DEFINE_integer("tokens", 16384, "tokens routed per grouped matmul")
flags.DEFINE_integer("hidden", 2048, "K of the grouped matmul (Qwen3-30B-A3B hidden_size)")
flags.DEFINE_integer("inter", 768, "N of the grouped matmul (moe_intermediate_size)")
flags.DEFINE_integer("experts", 128, "experts")
flags.DEFINE_integer("top_k", 8, "experts per token")
flags.DEFINE_integer("reps", 10, "timed repetitions (median) after one compile run")
flags.DEFINE_list("backends", [], "MoE backends to time (default: every one this GPU runs)")
flags.DEFINE_integer("demo_steps", 2, "steps per demo stage")
flags.DEFINE_bool("skip_demo", False, "only the grouped matmuls")
flags.DEFINE_string("workdir", "", "demo workdir (default: a temporary directory)")
flags.DEFINE_bool("cpu_smoke", False, "run on CPU at tiny shapes (tests): no demo, no GPU")
FLAGS = flags.FLAGS


def fail(msg: str):
  print(f"gpu_check: {msg}", file=sys.stderr)
  sys.exit(2)


def run_demo(workdir: str, steps: int) -> dict:
  """The demo (configs/two_stage.py, small steps) under moe_backend=auto, attention=auto."""
  cmd = [sys.executable, "-m", "moedistill.train", "--config=configs/two_stage.py",
         f"--config.workdir={workdir}", "--config.data.train.max_rows=64",
         "--config.data.eval.max_rows=16", f"--config.stages.wrappers.steps={steps}",
         f"--config.stages.all.steps={steps}", "--config.train.log_every=1"]
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  out = {"ok": r.returncode == 0, "seconds": round(time.time() - t0, 1), "rc": r.returncode}
  if r.returncode:
    out["error"] = (r.stderr.strip().splitlines() or [""])[-1][:400]
    return out
  lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  keys = ("stage", "global_step", "loss", "kl", "tokens_per_s")
  out["first"] = {k: lines[0].get(k) for k in keys}
  out["last"] = {k: lines[-1].get(k) for k in keys}
  report = Path(workdir) / "report.json"
  if report.exists():
    out["report"] = json.loads(report.read_text())
  return out


def timed(fn, *args, reps: int) -> float:
  """Median seconds of fn(*args) after a first (compiling) call."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def gmm_programs(t, d, f, e, k, dtype):
  """{name: (jitted fwd+bwd, args)}: each backend through the dispatch seam, lax.ragged_dot
  over pre-sorted rows, and a dense matmul of the same FLOPs."""
  import jax
  import jax.numpy as jnp

  from moedistill.model import moe
  kx, kw, kr, kc = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (t, d), dtype)
  w = (jax.random.normal(kw, (e, d, f), jnp.float32) * d ** -0.5).astype(dtype)
  router = jax.random.normal(kr, (d, e), jnp.float32) * d ** -0.5

  def via(backend):
    def loss(x, w):
      _, weights, experts = moe.route(x, router, k, True)
      dispatch = moe.make_dispatch(backend, experts, weights, e)
      y = dispatch.combine(dispatch.gmm(dispatch.expand(x), w))
      return jnp.sum(y.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  out = {}
  m = t * k
  sizes = jnp.bincount(jax.random.randint(kc, (m,), 0, e), length=e).astype(jnp.int32)
  xs = jax.random.normal(kx, (m, d), dtype)
  ragged = jax.jit(jax.grad(lambda a, w: jnp.sum(jax.lax.ragged_dot(a, w, sizes).astype(
      jnp.float32)), argnums=(0, 1)))
  dense = jax.jit(jax.grad(lambda a, w: jnp.sum((a @ w).astype(jnp.float32)), argnums=(0, 1)))
  out["lax.ragged_dot"] = (ragged, (xs, w))
  out["dense"] = (dense, (xs, w[0]))
  return via, (x, w), out


def main(argv):
  del argv
  import jax

  from moedistill.model import moe, resolve
  host = resolve.host_target()
  if FLAGS.cpu_smoke:
    t, d, f, e, k, dtype = 64, 32, 24, 8, 2, "float32"
    backends = FLAGS.backends or ["sorted", "ragged", "pallas"]
  else:
    if host.platform != "cuda":
      fail(f"no GPU: jax sees {host.platform} ({host.device_kind}); this check needs an "
           "NVIDIA GPU (run it on a machine with one)")
    t, d, f, e, k, dtype = (FLAGS.tokens, FLAGS.hidden, FLAGS.inter, FLAGS.experts, FLAGS.top_k,
                            "bfloat16")
    backends = FLAGS.backends or [b for b in moe.BACKENDS if resolve.unsupported(
        "moe_backend", b, host.platform, host.device_kind) is None]
  for b in backends:
    if b not in moe.BACKENDS:
      fail(f"--backends={','.join(backends)}: {b!r} is not one of {list(moe.BACKENDS)}")
  result = {"device_kind": host.device_kind, "jax": jax.__version__,
            "shape": {"tokens": t, "hidden": d, "inter": f, "experts": e, "top_k": k,
                      "dtype": dtype},
            "auto": resolve.resolve(host.platform, host.device_kind,
                                    (("gmm", d, f),)).moe_backend}
  if not (FLAGS.cpu_smoke or FLAGS.skip_demo):
    with tempfile.TemporaryDirectory() as tmp:
      result["demo"] = run_demo(FLAGS.workdir or tmp, FLAGS.demo_steps)
  flops = 6 * t * k * d * f
  via, args, refs = gmm_programs(t, d, f, e, k, getattr(jax.numpy, dtype))
  tflops, errors = {}, {}
  reps = 1 if FLAGS.cpu_smoke else FLAGS.reps
  for name, (fn, a) in [*((b, (via(b), args)) for b in backends), *refs.items()]:
    try:
      v = flops / timed(fn, *a, reps=reps) / 1e12
      tflops[name] = v if FLAGS.cpu_smoke else round(v, 3)  # tiny shapes: tiny figures
    except Exception as ex:  # noqa: BLE001: one backend failing must not hide the others
      errors[name] = f"{type(ex).__name__}: {(str(ex).splitlines() or [''])[0][:300]}"
  result["gmm_fwd_bwd_tflops"] = tflops
  if errors:
    result["errors"] = errors
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
