"""The out-of-the-box job on the embedded teacher, shortened: the same command and config
with fewer rows and steps. Report written, distillation lowers KL, the export generates text
in transformers, and a second run reuses everything (caches, student and checkpoints are not
rewritten)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

REPO = Path(__file__).resolve().parents[2]


def run(workdir, *extra):
  cmd = [sys.executable, "-m", "moedistill.train", "--config=configs/two_stage.py",
         f"--config.workdir={workdir}", "--config.data.train.max_rows=256",
         "--config.stages.wrappers.steps=30", "--config.stages.all.steps=30", *extra]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def built(work) -> dict:
  """What a rerun must reuse, not rebuild: every file with its size and modification time."""
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
          for d in ("cache", "student_init", "checkpoints") for p in (work / d).rglob("*")
          if p.is_file()}


def test_demo_pipeline_end_to_end(tmp_path):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  work = tmp_path / "demo"
  first = run(work)
  report = json.loads((work / "report.json").read_text())
  assert set(report) == {"teacher", "student_init", "student_distilled"}
  for r in report.values():
    assert {"ppl", "kl", "top1_agreement"} <= set(r)
  assert report["teacher"]["kl"] < 0.01 and report["teacher"]["top1_agreement"] > 0.99
  assert report["student_distilled"]["kl"] < report["student_init"]["kl"]
  # greedy exact match on 64 held-out task prompts (training/gen_eval.py): every model, every
  # task; the teacher reproduces its own forced answers (1.0 on every task when measured)
  gen = {k: r["gen_exact_match"] for k, r in report.items()}
  for g in gen.values():
    assert set(g) == {"arithmetic", "brackets", "facts", "grammar", "overall", "prompts"}
    assert g["prompts"] == 64
  assert gen["teacher"]["overall"] >= 0.9 and "greedy exact match (64)" in first.stdout
  assert (work / "loss_curves.png").stat().st_size > 1000
  assert "distilled student" in first.stdout
  tok = AutoTokenizer.from_pretrained(work / "export")
  model = AutoModelForCausalLM.from_pretrained(work / "export").eval()
  ids = tok("alice lives in", return_tensors="pt").input_ids
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
  assert out.shape[1] > ids.shape[1] and tok.decode(out[0, ids.shape[1]:]).strip()

  before = built(work)
  assert any("/cache/train/" in p for p in before) and any("student_init" in p for p in before)
  second = run(work, "--config.report.after_train=False")  # reuse is the subject here
  assert "resumed from" in second.stdout and "building the zero-shot" not in second.stdout
  assert "caching" not in second.stderr
  assert built(work) == before
