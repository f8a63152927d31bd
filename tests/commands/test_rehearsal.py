"""Full-structure rehearsal: a teacher with Qwen3-30B-A3B's structure (48 layers, 128 experts
top-8, vocab 151936, several bf16 shard files) at narrow width, made by `transformers`, through
the whole `train` command (cache, zero-shot student, stage `all`, export, report) on 8 forced
CPU devices with an fsdp=8 mesh. One stage: `all` (everything but the embeddings) holds the
largest train state, gradients and Adam moments of nearly every parameter; moving from one
stage to the next is tested at small size (tests/training/test_train.py). The export loads
and runs in `transformers` with the teacher's parameter count. Prints the wall time and the
peak RSS of the run (docs/benchmarks.md, "Full-structure rehearsal")."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import job_config, make_tokenizer, with_devices, write_config_file

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

QWEN3_30B_STRUCTURE = dict(
    vocab_size=151936, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    # narrow widths (the real ones: hidden 2048, 32/4 heads of 128, moe_intermediate 768)
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.05)

# The run's peak RSS must leave room on a 23 GB, 2-core CI machine.
RSS_CAP_GIB = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  path = tmp_path_factory.mktemp("rehearsal") / "teacher"
  torch.manual_seed(0)
  model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**QWEN3_30B_STRUCTURE)).to(torch.bfloat16)
  model.save_pretrained(path, max_shard_size="40MB")
  make_tokenizer(path)
  n_params = sum(p.numel() for p in model.parameters())
  del model
  return path, n_params


def _run_measured(cmd, env):
  """Runs cmd in a child of a fresh interpreter so RUSAGE_CHILDREN is this run's alone."""
  import subprocess
  probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(r.returncode)")
  t0 = time.time()
  out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                       env=env, timeout=1800)
  return out, time.time() - t0


def test_full_structure_train_export_loads_in_transformers(teacher, tmp_path):
  path, n_teacher = teacher
  shards = sorted(path.glob("model-*.safetensors"))
  assert len(shards) >= 2, "the rehearsal needs a multi-shard teacher"
  c = job_config(tmp_path, path, train_docs=120, **{"report.after_train": True})
  c.data.seq_len = 128
  c.cache.k = 64
  c.cache.rows_per_chunk = 8
  c.cache.vocab_chunk = 16384
  c.student.rank = 4
  c.mesh.data, c.mesh.fsdp = 1, 8
  c.train.batch_size = 8
  c.stage_order = "all"
  c.stages.all.steps = 2
  c.train.checkpoint_every = 2
  c.model.scan_layers = True  # 48 identical layers: one compiled layer (docs/benchmarks.md)
  cfg = write_config_file(tmp_path, c)
  env = dict(os.environ, XLA_FLAGS=with_devices(8),
             JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # one process compiles each program once
  out, wall = _run_measured([sys.executable, "-m", "moedistill.train", f"--config={cfg}"], env)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
  peak_gib = int(out.stdout.split("PEAK_RSS_KIB")[-1].split()[0]) / 2**20
  print(f"\nrehearsal: train command {wall:.0f}s, peak RSS {peak_gib:.2f} GiB")
  assert peak_gib < RSS_CAP_GIB

  export = Path(c.workdir) / "export"
  assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 48
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(export)
  assert sum(p.numel() for p in model.parameters()) == n_teacher
  ids = torch.tensor(np.arange(1, 33)[None] % 60)
  with torch.no_grad():
    logits = model(ids).logits
  assert logits.shape == (1, 32, 151936) and torch.isfinite(logits).all()
  report = json.loads((Path(c.workdir) / "report.json").read_text())
  assert set(report) >= {"teacher", "student_init", "student_distilled"}
