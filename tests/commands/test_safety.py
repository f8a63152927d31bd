"""Safety: weights only from safetensors (a pickle checkpoint is refused, never unpickled), no
remote code (a tokenizer or model that asks for it is refused and its code never runs), and a
whole run writes nothing outside its configured paths."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import job_config, make_hf_checkpoint, make_tokenizer, run_cli, write_config_file
from moedistill.errors import CheckpointFileError
from moedistill.hub import hf

pytestmark = pytest.mark.slow  # whole commands or training runs in processes


def test_pickle_checkpoint_is_refused(tmp_path):
  import torch
  make_hf_checkpoint(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (Path.touch, (marker,))

  torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(CheckpointFileError, match="neither model.safetensors"):
    hf.load_model(tmp_path)
  assert not marker.exists()


def _custom_code(directory: Path, config_name: str, auto_map: dict, **fields) -> Path:
  """Makes `directory` ask for remote code: a module that, if ever imported, leaves a marker
  file, named by auto_map in `config_name`. Returns the marker's path."""
  marker = directory / "pwned"
  (directory / "evil.py").write_text(
      f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
      "from transformers import PreTrainedTokenizerFast, PretrainedConfig\n"
      "class EvilTokenizer(PreTrainedTokenizerFast): pass\n"
      "class EvilConfig(PretrainedConfig): model_type = 'evil'\n")
  f = directory / config_name
  f.write_text(json.dumps({**json.loads(f.read_text()), "auto_map": auto_map, **fields}))
  return marker


def _one_line_refusal(r, expected):
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_tokenizer_with_custom_code_is_refused_not_run(tmp_path):
  teacher, tok = tmp_path / "teacher", tmp_path / "tokenizer"
  make_hf_checkpoint(teacher, vocab_size=64)
  make_tokenizer(tok)
  marker = _custom_code(tok, "tokenizer_config.json",
                        {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
                        tokenizer_class="EvilTokenizer")
  c = job_config(tmp_path, teacher, **{"data.tokenizer": str(tok)})
  r = run_cli("moedistill.cache_logits", f"--config={write_config_file(tmp_path, c)}")
  _one_line_refusal(r, "custom code")
  assert not marker.exists() and not (tmp_path / "run").exists()


def test_model_with_custom_code_is_refused_not_run(tmp_path):
  teacher = tmp_path / "teacher"
  make_hf_checkpoint(teacher)
  marker = _custom_code(teacher, "config.json", {"AutoConfig": "evil.EvilConfig",
                                                 "AutoModelForCausalLM": "evil.EvilModel"},
                        model_type="evil")
  r = run_cli("moedistill.compress", f"--teacher={teacher}", f"--out={tmp_path / 'out'}",
              "--rank=2")
  _one_line_refusal(r, "model_type")
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_run_writes_only_inside_its_paths(tmp_path):
  teacher = tmp_path / "inputs" / "teacher"
  make_hf_checkpoint(teacher, vocab_size=64)
  make_tokenizer(teacher)
  c = job_config(tmp_path / "inputs", teacher, **{"report.after_train": True})  # its writes too
  c.workdir = str(tmp_path / "work")
  c.cache.path = str(tmp_path / "cache")
  c.stages.wrappers.steps, c.stages.all.steps, c.train.batch_size = 2, 2, 4
  cfg = write_config_file(tmp_path / "inputs", c)
  home, cwd, tmpdir = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmpdir"
  for d in (home, cwd, tmpdir):
    d.mkdir()
  before = {p for p in (tmp_path / "inputs").rglob("*")}
  env = dict(os.environ, HOME=str(home), TMPDIR=str(tmpdir), XDG_CACHE_HOME=str(home / ".cache"))
  env.pop("MPLCONFIGDIR", None)
  r = subprocess.run([sys.executable, "-m", "moedistill.train", f"--config={cfg}"], cwd=cwd,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "work" / "export" / "model.safetensors").exists()
  assert (tmp_path / "cache" / "train" / "metadata.json").exists()
  written = [p for d in (home, cwd) for p in d.rglob("*") if p.is_file()]
  assert written == [], written
  assert {p for p in (tmp_path / "inputs").rglob("*")} == before
  top = {p.name for p in tmp_path.iterdir()}
  assert top == {"inputs", "work", "cache", "home", "cwd", "tmpdir"}, top
