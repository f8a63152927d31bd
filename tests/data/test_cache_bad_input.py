"""cache_logits refuses bad input with one line naming the value, exit 2, nothing changed."""
import json

import pytest

from conftest import job_config, make_tokenizer, run_cli, snapshot, write_config_file


def _case(tmp_path, teacher, name):
  """Returns (config overrides, text expected in the error line)."""
  if name == "missing_data_file":
    return {"data.eval.source": [str(tmp_path / "nope.jsonl")]}, "nope.jsonl matches no file"
  if name == "text_field_absent":
    return {"data.text_field": "body"}, "data.text_field='body'"
  if name == "non_utf8_line":
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    return ({"data.eval.source": [str(tmp_path / "latin1.jsonl")]},
            "latin1.jsonl line 1 is not valid UTF-8")
  if name == "tokenizer_vocab_too_large":
    make_tokenizer(tmp_path / "bigtok", vocab_size=90)
    return {"data.tokenizer": str(tmp_path / "bigtok")}, "exceeds the teacher's vocab_size=64"
  if name == "k_above_vocab":
    return {"cache.k": 65}, "config.cache.k=65"
  if name == "temperature_not_positive":
    return {"cache.temperatures": [1.0, 0.0]}, "config.cache.temperatures=[1.0, 0.0]"
  if name == "unwritable_path":
    (tmp_path / "ro").write_text("a file, not a directory")
    return {"cache.path": str(tmp_path / "ro" / "cache")}, "cache.path="
  if name == "mismatched_cache":
    return {"cache.k": 4}, "different k (8 vs 4)"
  raise KeyError(name)


CASES = ["missing_data_file", "text_field_absent", "non_utf8_line", "tokenizer_vocab_too_large",
         "k_above_vocab",
         "temperature_not_positive", "unwritable_path", "mismatched_cache"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input(tmp_path, teacher_dir, name):
  path, _ = teacher_dir
  if name == "mismatched_cache":  # a finished cache made with k=8 is already there
    good = write_config_file(tmp_path, job_config(tmp_path, path), "good.py")
    assert run_cli("moedistill.cache_logits", f"--config={good}", "--split=eval").returncode == 0
  over, expected = _case(tmp_path, path, name)
  cfg = write_config_file(tmp_path, job_config(tmp_path, path, **over))
  before = snapshot(tmp_path)
  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=eval")
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
  assert snapshot(tmp_path) == before
  if name == "mismatched_cache":  # --overwrite replaces it
    ok = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=eval", "--overwrite")
    assert ok.returncode == 0, ok.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "cache" / "eval" / "metadata.json").read_text())
    assert meta["k"] == 4 and meta["complete"]
