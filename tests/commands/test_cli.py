"""The one CLI stack: overrides of every field (lists included) reach the Job; bad overrides
are one line, exit 2, nothing written; every command takes --config and the multi-host flags
and works from a config alone."""
import json
import sys
from pathlib import Path

import pytest

from conftest import job_config, make_hf_checkpoint, make_tokenizer, run_cli, write_config_file

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

REPO = Path(__file__).resolve().parents[2]
COMMANDS = sorted(p.stem for p in (REPO / "moedistill").glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text())

# A command that prints the Job built from --config and its overrides.
PRINT_JOB = """
import json
from moedistill import cli

def main(argv):
  job, _ = cli.load_job(argv)
  st = {s.name: s for s in job.train.stages}
  print(json.dumps(dict(train=job.train_data.source, eval=job.eval_data.source,
                        hub=job.eval_data.hub_config, temps=job.cache.temperatures,
                        groups=[[g.pattern, g.lr_mult, g.weight_decay]
                                for g in st["all"].groups],
                        lr=st["all"].lr, k=job.cache.k, order=[s.name for s in job.train.stages])))

cli.run(main)
"""


CONFIG = REPO / "configs" / "two_stage.py"


def print_job(*args):
  import subprocess
  return subprocess.run([sys.executable, "-c", PRINT_JOB, f"--config={CONFIG}", *args],
                        capture_output=True, text=True, timeout=300)


def test_overrides_of_lists_and_scalars_reach_the_job():
  r = print_job("--config.data.train.source=/a.jsonl,/b.jsonl",
                "--config.data.eval.source=HuggingFaceFW/fineweb-edu",
                "--config.data.eval.hub_config=sample-10BT",
                "--config.cache.temperatures=1,2,4",
                """--config.stages.all.groups=[(".*embed.*", 0.0), (".*", 1.0, 0.01)]""",
                "--config.stages.all.lr=0.5", "--config.cache.k=7",
                "--config.stage_order=all")
  assert r.returncode == 0, r.stderr[-2000:]
  job = json.loads(r.stdout.strip().splitlines()[-1])
  assert job["train"] == ["/a.jsonl", "/b.jsonl"]
  assert job["eval"] == ["HuggingFaceFW/fineweb-edu"] and job["hub"] == "sample-10BT"
  assert job["temps"] == [1.0, 2.0, 4.0]
  assert job["groups"] == [[".*embed.*", 0.0, None], [".*", 1.0, 0.01]]
  assert job["lr"] == 0.5 and job["k"] == 7 and job["order"] == ["all"]


def test_list_literal_forms_agree():
  r = print_job("--config.cache.temperatures=[3, 5.5]",
                "--config.data.train.source=['/x,y.jsonl']")
  assert r.returncode == 0, r.stderr[-2000:]
  job = json.loads(r.stdout.strip().splitlines()[-1])
  assert job["temps"] == [3.0, 5.5] and job["train"] == ["/x,y.jsonl"]


BAD = {
    "no_field": ("--config.cache.kk=1", "--config.cache.kk: config.cache has no field 'kk'"),
    "no_section": ("--config.nosuch.x=1", "config has no field 'nosuch'"),
    "not_a_section": ("--config.seed.x=1", "config.seed has no field 'x'"),
    "scalar_type": ("--config.cache.k=abc", "--config.cache.k=abc"),
    "placeholder_type": ("--config.stages.all.lr=fast", "--config.stages.all.lr=fast"),
    "element_type": ("--config.cache.temperatures=a,b",
                     "config.cache.temperatures=['a', 'b']: expected positive numbers"),
    "group_type": ("""--config.stages.all.groups=[(".*", "x")]""",
                   "config.stages.all.groups: ('.*', 'x'), expected (regex"),
    "empty_source": ("--config.data.train.source=[]", "config.data.train.source is empty"),
    "empty_temperatures": ("--config.cache.temperatures=", "config.cache.temperatures is empty"),
    "empty_groups": ("--config.stages.all.groups=[]", "config.stages.all.groups is empty"),
    "bad_variant": (f"--config={CONFIG}:nope", "unknown variant"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_override_one_line_exit_2_nothing_written(tmp_path, name):
  flag, expected = BAD[name]
  work = tmp_path / "run"
  r = run_cli("moedistill.train", f"--config={CONFIG}", f"--config.workdir={work}", flag)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_config_and_multihost_flags(tmp_path, command):
  """The config file is read through the shared stack (a missing one is one line naming it);
  the multi-host flags are defined (an unknown flag would be refused first)."""
  missing = tmp_path / "missing.py"
  r = run_cli(f"moedistill.{command}", f"--config={missing}", "--num_processes=1",
              "--process_id=0", "--coordinator=")
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.py" in lines[0], lines


def test_commands_are_the_readme_ones():
  assert {"train", "cache_logits", "params", "compress", "export", "evaluate"} <= set(COMMANDS)


@pytest.fixture(scope="module")
def from_config(tmp_path_factory):
  """A tiny teacher and a config naming it; the eval cache made by cache_logits --config."""
  tmp = tmp_path_factory.mktemp("cli")
  teacher = tmp / "teacher"
  make_hf_checkpoint(teacher, vocab_size=64)
  make_tokenizer(teacher)
  c = job_config(tmp, teacher)
  c.student.rank = 3
  cfg = write_config_file(tmp, c)
  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=eval")
  assert r.returncode == 0, r.stderr[-2000:]
  return tmp, cfg


def test_compress_evaluate_export_from_config_alone(from_config):
  tmp, cfg = from_config
  init = tmp / "run" / "student_init"
  r = run_cli("moedistill.compress", f"--config={cfg}")
  assert r.returncode == 0, r.stderr[-2000:]
  comp = json.loads((init / "config.json").read_text())["compression"]
  assert [comp[f"rank_{q}"] for q in ("gate", "up", "down")] == [3, 3, 3]
  r = run_cli("moedistill.evaluate", f"--config={cfg}", f"--checkpoint={init}")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout[r.stdout.index("{"):])
  assert out["tokens"] > 0 and out["kl"] > 0
  r = run_cli("moedistill.export", f"--config={cfg}", f"--out={tmp / 'exported'}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp / "exported" / "config.json").exists()
  assert "compression" not in json.loads((tmp / "exported" / "config.json").read_text())
  r = run_cli("moedistill.params", f"--config={cfg}")
  assert r.returncode == 0 and "wrapper.gate_a" in r.stdout, r.stderr[-2000:]


def test_flags_override_the_config(from_config):
  tmp, cfg = from_config
  out = tmp / "rank2"
  r = run_cli("moedistill.compress", f"--config={cfg}", f"--out={out}", "--rank=2",
              "--rank_down=1")
  assert r.returncode == 0, r.stderr[-2000:]
  comp = json.loads((out / "config.json").read_text())["compression"]
  assert [comp[f"rank_{q}"] for q in ("gate", "up", "down")] == [2, 2, 1]
