"""`evaluate --full_vocab`: the exact full-vocab KL(teacher || student) equals an independent
float64 NumPy KL (dense logits of both models from a plain forward, float64 softmaxes, the
valid-token mask rebuilt from segment ids) to 1e-4 relative; teacher_topk_mass equals the
cache's top-k log-probs summed in float64; train's report table has the "KL (full vocab)"
column with the same figures."""
import json
import shutil

import numpy as np
import pytest

from conftest import job_config, make_hf_checkpoint, run_cli, write_config_file

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny teacher (vocab 64) with its eval cache, and a different random student of the
  same shape (seed 1) standing in for a distilled export."""
  from conftest import make_tokenizer
  from moedistill.cache_logits import build_cache
  from moedistill.config import job_from_config
  tmp = tmp_path_factory.mktemp("fullkl")
  make_hf_checkpoint(tmp / "teacher", vocab_size=64)
  make_tokenizer(tmp / "teacher")
  make_hf_checkpoint(tmp / "student", seed=1, vocab_size=64)
  shutil.copy(tmp / "teacher" / "tokenizer.json", tmp / "student")
  c = job_config(tmp, tmp / "teacher")
  job = job_from_config(c)
  build_cache(job, "eval", progress=False)
  return tmp, c, job


def numpy_full_kl(job, student_dir, temperature):
  """(mean full-vocab KL, mean cached top-k mass) in float64 from dense logits."""
  import jax.numpy as jnp
  from moedistill.data.cache import CacheReader
  from moedistill.hub import hf
  reader = CacheReader(job.cache_path("eval"))
  rows = reader.read_rows(np.arange(reader.rows))
  tokens, segs = rows["tokens"], rows["segment_ids"]
  logits = {}
  for name, path in (("s", student_dir), ("t", job.teacher)):
    model, _ = hf.load_model(path, job.model)
    z, _ = model(jnp.asarray(tokens), jnp.asarray(segs))
    logits[name] = np.asarray(z, np.float64) / temperature
  # position i predicts i+1 inside one document (segment id > 0)
  valid = np.zeros(tokens.shape, bool)
  valid[:, :-1] = (segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp, logq = log_softmax(logits["t"]), log_softmax(logits["s"])
  kl = (np.exp(logp) * (logp - logq)).sum(-1)
  t_index = reader.temperature_index(temperature)
  cached = rows["topk_logit"].astype(np.float64) / temperature - \
      rows["lse"][..., t_index:t_index + 1].astype(np.float64)
  mass = np.exp(cached).sum(-1)
  return kl[valid].mean(), mass[valid].mean(), int(valid.sum())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_evaluate_full_vocab_equals_float64(setup, temperature):
  tmp, c, job = setup
  cfg = write_config_file(tmp, c, name=f"cfg_{int(temperature)}.py")
  r = run_cli("moedistill.evaluate", f"--config={cfg}", f"--checkpoint={tmp / 'student'}",
              "--full_vocab", f"--temperature={temperature}")
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout[r.stdout.index("{"):])
  kl, mass, n = numpy_full_kl(job, tmp / "student", temperature)
  assert out["tokens"] == n
  assert kl > 0.05  # a real gap, so that 1e-4 relative is a real test
  np.testing.assert_allclose(out["kl_full"], kl, rtol=1e-4)
  np.testing.assert_allclose(out["teacher_topk_mass"], mass, rtol=1e-5)
  # coarsening to {top-k, tail} can only lower a KL: bucket mode is a lower bound
  assert out["kl"] <= out["kl_full"] + 1e-6


def test_teacher_flag_needs_full_vocab(setup):
  tmp, c, _ = setup
  cfg = write_config_file(tmp, c, name="cfg_flag.py")
  r = run_cli("moedistill.evaluate", f"--config={cfg}", f"--teacher={tmp / 'teacher'}")
  assert r.returncode == 2 and r.stderr.strip() == (
      f"error: --teacher={tmp / 'teacher'}: read only with --full_vocab")


def test_report_table_has_full_vocab_column(setup, capsys):
  from moedistill.report import write_report
  tmp, c, job = setup
  workdir = tmp / "run"
  shutil.copytree(tmp / "student", workdir / "export", dirs_exist_ok=True)
  shutil.copytree(tmp / "student", workdir / "student_init", dirs_exist_ok=True)
  report = write_report(job)
  out = capsys.readouterr().out
  header = out.splitlines()[0]
  assert "KL (full vocab)" in header
  kl, _, _ = numpy_full_kl(job, tmp / "student", 1.0)
  for key in ("student_init", "student_distilled"):
    np.testing.assert_allclose(report[key]["kl_full"], kl, rtol=1e-4)
  assert abs(report["teacher"]["kl_full"]) < 1e-5
  line = next(l for l in out.splitlines() if l.startswith("distilled student"))  # noqa: E741
  assert f"{report['student_distilled']['kl_full']:.4f}" in line.split()
  assert json.loads((workdir / "report.json").read_text())["teacher"]["kl_full"] == \
      report["teacher"]["kl_full"]
