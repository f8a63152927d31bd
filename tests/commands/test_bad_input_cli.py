"""compress, export, evaluate and params refuse bad input with one line naming the value:
exit 2, no traceback, no file changed (cache_logits and train: their own test files)."""
import pytest

from conftest import job_config, make_hf_checkpoint, run_cli, snapshot, write_config_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A teacher, a native student and a small eval cache, shared by the cases (each case only
  adds its own uniquely named inputs and checks nothing else changes)."""
  from conftest import make_tokenizer
  tmp_path = tmp_path_factory.mktemp("bad_cli")
  path = tmp_path / "teacher"
  make_hf_checkpoint(path, vocab_size=64)
  make_tokenizer(path)
  assert run_cli("moedistill.compress", f"--teacher={path}", f"--out={tmp_path / 'student'}",
                 "--rank=2").returncode == 0
  good = write_config_file(tmp_path, job_config(tmp_path, path), "good.py")
  assert run_cli("moedistill.cache_logits", f"--config={good}", "--split=eval").returncode == 0
  return tmp_path, path


def _cases(tmp, teacher):
  other = tmp / "other_model"
  student, cache = tmp / "student", tmp / "run" / "cache" / "eval"
  trunc = tmp / "trunc"
  return {
      "compress_no_config": (["moedistill.compress", f"--teacher={tmp}", f"--out={tmp / 'x'}",
                              "--rank=2"], "no config.json"),
      "compress_rank_zero": (["moedistill.compress", f"--teacher={teacher}",
                              f"--out={tmp / 'x'}", "--rank=0"], "rank_gate=0"),
      "compress_out_exists": (["moedistill.compress", f"--teacher={teacher}",
                               f"--out={student}", "--rank=2"], "already exists"),
      "export_out_exists": (["moedistill.export", f"--checkpoint={student}",
                             f"--out={student}"], "already exists"),
      "export_bad_format": (["moedistill.export", f"--checkpoint={student}",
                             f"--out={tmp / 'e'}", "--format=gguf"], "--format='gguf'"),
      "export_truncated": (["moedistill.export", f"--checkpoint={trunc}", f"--out={tmp / 'e'}"],
                           "model.safetensors: truncated"),
      "evaluate_no_cache": (["moedistill.evaluate", f"--checkpoint={student}",
                             f"--cache={tmp / 'nocache'}"], "no metadata.json"),
      "evaluate_temperature": (["moedistill.evaluate", f"--checkpoint={student}",
                                f"--cache={cache}", "--temperature=3.0"],
                               "temperature=3.0 is not cached"),
      "evaluate_vocab_mismatch": (["moedistill.evaluate", f"--checkpoint={other}",
                                   f"--cache={cache}"], "vocab_size=64, the student has 101"),
      "params_invalid_regex": (["moedistill.params", f"--config={tmp / 'regex.py'}"],
                               "invalid regex '[wrapper'"),
      "compress_no_teacher": (["moedistill.compress", f"--out={tmp / 'x'}", "--rank=2"],
                              "--teacher is required"),
      "export_no_out": (["moedistill.export", f"--checkpoint={student}"], "--out is required"),
      "params_no_config": (["moedistill.params"], "--config is required"),
  }, other, trunc


CASE_NAMES = ["compress_no_config", "compress_rank_zero", "compress_out_exists",
              "export_out_exists", "export_bad_format", "export_truncated", "evaluate_no_cache",
              "evaluate_temperature", "evaluate_vocab_mismatch", "params_invalid_regex",
              "compress_no_teacher", "export_no_out", "params_no_config"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(setup, name):
  tmp, teacher = setup
  cases, other, trunc = _cases(tmp, teacher)
  if name == "evaluate_vocab_mismatch":
    make_hf_checkpoint(other)  # vocab 101
  if name == "export_truncated":
    import shutil
    shutil.copytree(tmp / "student", trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
  if name == "params_invalid_regex":
    write_config_file(tmp, job_config(tmp, teacher, **{
        "stages.wrappers.groups": [["[wrapper", 1.0], [".*", 0.0]]}), "regex.py")
  args, expected = cases[name]
  before = snapshot(tmp)
  r = run_cli(*args)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
  assert snapshot(tmp) == before


def test_params_cli_lists_every_path_with_its_group(setup):
  tmp, teacher = setup
  cfg = write_config_file(tmp, job_config(tmp, teacher), "p.py")
  r = run_cli("moedistill.params", f"--config={cfg}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "# stage wrappers" in r.stdout and "# stage all" in r.stdout
  line = next(l for l in r.stdout.splitlines() if l.startswith("layers.0.mlp.experts.wrapper.gate_a"))
  assert "(.*wrapper.*) lr x1" in line
  assert any(l.startswith("embed_tokens.embedding") and "frozen" in l
             for l in r.stdout.splitlines())
