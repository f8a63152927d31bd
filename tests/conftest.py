"""Shared fixtures: tiny random Qwen3-MoE checkpoints written by transformers itself."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One persistent XLA compilation cache for the whole session: the suite compiles the same tiny
# programs in many tests and CLI subprocesses (they inherit the variables), and a cached
# executable is the one XLA would build. Made by the first process to load this file (the
# xdist controller, whose workers inherit it) and removed by that process at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moedistill-tests-xla-")
  os.environ["MOEDISTILL_TESTS_OWN_XLA_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")

# Test programs are tiny, so compiling them is most of their time: XLA:CPU's LLVM backend at
# optimisation level 0 without its expensive passes compiles them in about three quarters of
# the CPU time (the not-slow tests: 384 s of user time against 502 s) and computes the same
# operations (matmuls and convolutions are library calls either way). Processes the tests
# start inherit the variable; those that force a device count append to it (`with_devices`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def with_devices(n: int) -> str:
  """XLA_FLAGS for a child process with n forced CPU devices (and the suite's flags)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


# The longest files (minutes each with --durations on 2 cores), started first so that the two
# workers finish together instead of one running the rehearsal alone at the end. The benchmark
# smoke runs (docs/test_benchmarks.py, 5 min) stay out of the list so that they do not run
# beside the rehearsal: the two together are the suite's largest memory peak, and the rehearsal
# aborted once (SIGABRT in its compress step) in a run where they overlapped.
LONGEST_FIRST = ("commands/test_rehearsal.py", "training/test_sweep.py",
                 "training/test_on_policy.py", "commands/test_plan.py", "model/test_remat.py",
                 "model/test_pallas_train.py",
                 "training/test_multihost.py", "commands/test_first_hour.py",
                 "data/test_data_safety.py", "data/test_sampled_cache.py",
                 "model/test_expert_parallel.py", "training/test_train.py")


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    path = item.path.as_posix()
    return next((i for i, f in enumerate(LONGEST_FIRST) if path.endswith("tests/" + f)),
                len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: each file's own order is kept


# Test modules share helpers across groups (`from test_train import small`): every group folder
# is importable by module name, also when one file runs alone.
sys.path[:0] = [str(d) for d in sorted(Path(__file__).parent.iterdir())
                if d.is_dir() and not d.name.startswith(("_", "."))]


def pytest_sessionfinish(session, exitstatus):
  if os.environ.get("MOEDISTILL_TESTS_OWN_XLA_CACHE") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

TINY_HF = dict(vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=20,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
               num_experts=6, num_experts_per_tok=2, initializer_range=0.1,
               max_position_embeddings=256)


def make_hf_checkpoint(path, seed=0, max_shard_size=None, **overrides):
  """Random-init transformers Qwen3MoeForCausalLM saved with save_pretrained; returns the model."""
  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  torch.manual_seed(seed)
  cfg = Qwen3MoeConfig(**{**TINY_HF, **overrides})
  model = Qwen3MoeForCausalLM(cfg).eval()
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kw)
  return model


def torch_logits(model, tokens, **kw):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.array(tokens)), **kw).logits.float().numpy()


@pytest.fixture
def hf_tiny(tmp_path):
  path = tmp_path / "teacher"
  model = make_hf_checkpoint(path)
  return path, model


WORDS = ("the cat dog sat on a mat and ran to big red blue house tree bird sings "
         "one two three four five six seven eight nine ten plus minus equals").split()


def make_corpus(path, n_docs=40, seed=0):
  """Local jsonl of short random-word documents (some long enough to span rows)."""
  import json
  r = np.random.RandomState(seed)
  with open(path, "w") as f:
    for i in range(n_docs):
      n = int(r.randint(3, 40))
      f.write(json.dumps({"text": " ".join(r.choice(WORDS, n)), "id": i}) + "\n")
  return path


def make_tokenizer(path, vocab_size=60):
  """A small BPE tokenizer trained on WORDS, saved as a transformers fast tokenizer."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"])
  tok.train_from_iterator([" ".join(WORDS)] * 3, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
  fast.save_pretrained(path)
  return fast


def job_config(tmp_path, teacher, /, train_docs=40, **over):
  """configs/two_stage.py pointed at a test teacher and corpus, small cache settings."""
  import importlib.util
  import pathlib
  spec = importlib.util.spec_from_file_location(
      "two_stage", pathlib.Path(__file__).parent.parent / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.workdir = str(tmp_path / "run")
  c.teacher = str(teacher)
  c.data.seq_len = 16
  c.data.train.source = [str(make_corpus(tmp_path / "train.jsonl", n_docs=train_docs))]
  c.data.eval.source = [str(make_corpus(tmp_path / "eval.jsonl", n_docs=8, seed=1))]
  c.cache.k = 8
  c.cache.rows_per_chunk = 4
  c.cache.chunks_per_step = 1
  c.cache.vocab_chunk = 32
  # `train` ends without the report (evaluating three models is most of a tiny run's time):
  # the tests about the report or all of a run's writes turn it on (commands/test_first_hour,
  # test_rehearsal, test_safety; training/test_train checks the skip and the report command).
  c.report.after_train = False
  for k, v in over.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture
def teacher_dir(tmp_path):
  """Tiny HF teacher with a tokenizer in the same directory."""
  path = tmp_path / "teacher"
  model = make_hf_checkpoint(path, vocab_size=64)
  make_tokenizer(path)
  return path, model


def write_config_file(tmp_path, c, name="job_config.py"):
  """A config file for the CLIs holding exactly ConfigDict `c` (via JSON)."""
  import json
  blob = tmp_path / (name + ".json")
  blob.write_text(json.dumps(c.to_dict()))
  path = tmp_path / name
  path.write_text("import json\nimport ml_collections\n\n\ndef get_config(arg=''):\n"
                  f"  return ml_collections.ConfigDict(json.load(open({str(blob)!r})))\n")
  return path


def run_cli(module, *args, env=None, timeout=600):
  import subprocess
  import sys
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                        text=True, env=e, timeout=timeout)


def free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def snapshot(root):
  """Every file under `root` and its bytes (to show that nothing written was changed)."""
  return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
