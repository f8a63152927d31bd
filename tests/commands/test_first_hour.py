"""A new user's first hour (issue 22, items 6-9), each checked by running the command as the
user types it: `python -m moedistill.<command> ...` in a subprocess, from the repository root.

- `--help` on every command: its own flags and `--config`, exit 0;
- `params ... | head -3` and a reader that is already gone: no traceback, exit 0 or 141;
- refusals: one `error:` line and nothing before it, as a terminal shows stderr (no
  transformers advice when PyTorch is missing, no progress bar left on screen), the reason
  whole, the field the user set; a failed first start leaves no workdir, or names it;
- train: each stage's bar starts after its first (compiling) step, Ctrl-C prints
  `interrupted: rerun the same command to resume` with status 130, the rerun's resume line
  names the stage, stdout ends with the report table (report.json is on disk), and
  matplotlib's cache is not in the workdir.
The train tests share one tiny workdir (Ctrl-C in stage `all`, then a rerun finishes it).
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import job_config, make_corpus, make_hf_checkpoint, make_tokenizer, \
    write_config_file

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

ROOT = Path(__file__).resolve().parents[2]
# Every module with a `__main__` block is a command (a new one is covered without an edit here).
COMMANDS = sorted(p.stem for p in (ROOT / "moedistill").glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text())
# Flags each command must list under --help, beyond --config and the multi-host ones.
OWN_FLAGS = {
    "train": ["device_memory"],
    "cache_logits": ["overwrite", "split", "phase", "verify"],
    "compress": ["teacher", "out", "rank", "overwrite"],
    "export": ["checkpoint", "out", "format", "dtype", "max_shard_bytes", "overwrite"],
    "evaluate": ["checkpoint", "cache", "temperature"],
    "params": [],
    "plan": ["devices", "device_memory", "programs"],
    "sweep": ["sweep.alpha", "sweep.temperature", "sweep.k", "sweep.check_only"],
    "report": [],
    "generate": ["checkpoint", "prompt", "max_new_tokens"],
}


def cli(*args, env=None, drop=(), stdin=None):
  """The command as typed in a shell at the repository root; `drop`: environment variables
  the user does not have (the test session sets TRANSFORMERS_VERBOSITY, for one)."""
  e = {k: v for k, v in os.environ.items() if k not in drop}
  e.update(env or {})
  r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, env=e,
                     cwd=ROOT, timeout=600, stdin=stdin)
  # Decoded by hand: text=True would turn each carriage return into a newline.
  return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def screen(text: str) -> list[str]:
  """The non-empty lines a terminal shows for `text`: a carriage return goes back to the
  start of the line, and what follows overwrites it (how a progress bar redraws)."""
  lines = []
  for raw in text.split("\n"):
    buf: list[str] = []
    for part in raw.split("\r"):
      for col, ch in enumerate(part):
        if col < len(buf):
          buf[col] = ch
        else:
          buf.append(ch)
    if "".join(buf).strip():
      lines.append("".join(buf).rstrip())
  return lines


# --- --help -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helps():
  """`--help` of every command (`-h` for params), run side by side (each is a fresh
  interpreter importing JAX)."""
  procs = {c: subprocess.Popen([sys.executable, "-m", f"moedistill.{c}",
                                "-h" if c == "params" else "--help"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c in COMMANDS}
  return {c: (p.communicate(timeout=300), p.returncode) for c, p in procs.items()}


def test_every_command_is_covered():
  assert set(COMMANDS) <= set(OWN_FLAGS), f"add the new command's flags to OWN_FLAGS: {COMMANDS}"
  assert {"train", "cache_logits", "report"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_commands_flags_and_exits_0(helps, command):
  (out, err), rc = helps[command]
  assert rc == 0, err[-2000:]
  assert "Traceback" not in err
  listed = set(re.findall(r"^  --(?:\[no\])?([\w.]+)", out, re.M))
  assert {"config", *OWN_FLAGS.get(command, [])} <= listed, out


# --- a closed pipe ----------------------------------------------------------------------------

@pytest.mark.parametrize("reader", ["head -3", "true"])
def test_closed_pipe_ends_quietly(reader):
  """`head -3` closes the pipe after three lines (while params may still be writing); `true`
  has closed it before the first write, so that case never depends on timing."""
  cmd = (f"{sys.executable} -m moedistill.params --config=configs/two_stage.py | {reader}; "
         'echo "status=${PIPESTATUS[0]}" >&2')
  r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
  *err, status = r.stderr.splitlines()
  assert status in ("status=0", "status=141") and not err, r.stderr[-3000:]
  if reader == "head -3":
    assert r.stdout.splitlines()[0] == "# stage wrappers" and len(r.stdout.splitlines()) == 3


# --- refusals ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny teacher with its tokenizer, a corpus and a config file pointing at them."""
  tmp = tmp_path_factory.mktemp("first_hour")
  make_hf_checkpoint(tmp / "teacher", vocab_size=64)
  make_tokenizer(tmp / "teacher")
  c = job_config(tmp, tmp / "teacher", **{"report.after_train": True})
  c.stages.wrappers.steps = 3
  c.stages.all.steps = 100_000  # interrupted, then finished with a short override
  c.train.batch_size = 4
  c.train.checkpoint_every = 1_000_000  # only the stage ends save: the rerun resumes at 3
  return tmp, write_config_file(tmp, c)


def _refusal(r) -> str:
  """The one line a terminal shows on a refusal (the test fails if anything else shows)."""
  shown = screen(r.stderr)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(shown) == 1 and shown[0].startswith("error: "), shown
  return shown[0]


@pytest.mark.parametrize("override, field", [
    ("--config.train.alpha=1.5", "config.train.alpha=1.5: expected a value in [0, 1]"),
    ("--config.stages.all.alpha=2.0", "config.stages.all.alpha=2.0: expected a value in [0, 1]"),
])
def test_refusal_names_the_field_the_user_set(override, field):
  """A stage without its own alpha takes config.train.alpha: that is the field named."""
  r = cli("moedistill.train", "--config=configs/two_stage.py", override)
  assert _refusal(r) == f"error: {field}"


def test_refusal_without_pytorch_has_nothing_before_it(tiny, tmp_path):
  """transformers advises at import that PyTorch was not found; a user without PyTorch (here:
  an interpreter where `import torch` finds nothing) sees only the refusal. The workdir of
  this first start is not left behind."""
  _, cfg = tiny
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
  path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
  work = tmp_path / "run"
  r = cli("moedistill.train", f"--config={cfg}", f"--config.workdir={work}",
          f"--config.data.train.source={tmp_path / 'missing.jsonl'}",
          env={"PYTHONPATH": path}, drop=("TRANSFORMERS_VERBOSITY",))
  assert _refusal(r) == f"error: config.data.train.source: {tmp_path / 'missing.jsonl'} " \
                        "matches no file"
  assert not work.exists()


def test_data_refusal_is_whole_and_alone_on_screen(tiny, tmp_path):
  """A bad line in the train data is found while tokenizing, under a progress bar: the bar
  is gone from the screen, the JSON reason is whole (json's own message ends in "at", its
  position is the rest) and the partial cache this first start wrote is named."""
  _, cfg = tiny
  data = make_corpus(tmp_path / "bad.jsonl", n_docs=3)
  with open(data, "a") as f:
    f.write('{"text": "a control \x01 character"}\n')
  work = tmp_path / "run"
  line = _refusal(cli("moedistill.train", f"--config={cfg}", f"--config.workdir={work}",
                      f"--config.data.train.source={data}"))
  assert line.startswith(f"error: config.data.train.source: {data} line 4 is not valid JSON "
                         "(Invalid control character at: column 21)"), line
  assert not work.exists() or f"left {work} behind" in line, line


# --- train's output -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted(tiny):
  """train until stage `all` shows its bar, then Ctrl-C (SIGINT to the process)."""
  tmp, cfg = tiny
  p = subprocess.Popen([sys.executable, "-m", "moedistill.train", f"--config={cfg}"], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  err, seen = bytearray(), threading.Event()

  def read():
    while chunk := os.read(p.stderr.fileno(), 4096):
      err.extend(chunk)
      if b"stage all:" in err:
        seen.set()
  t = threading.Thread(target=read, daemon=True)
  t.start()
  if not seen.wait(timeout=400):
    p.kill()
    pytest.fail(err.decode()[-3000:])
  time.sleep(0.5)
  p.send_signal(signal.SIGINT)
  out = p.stdout.read()
  rc = p.wait(timeout=120)
  t.join(timeout=30)
  return rc, out.decode(), err.decode()


def test_ctrl_c_says_how_to_resume(interrupted):
  rc, _, err = interrupted
  assert rc == 130, err[-3000:]
  assert "Traceback" not in err
  assert screen(err)[-1] == "interrupted: rerun the same command to resume", err[-3000:]


def test_progress_bars_start_after_the_compiling_step(interrupted):
  """The first time a stage's (or the teacher cache's) bar is drawn it already counts one
  step: its clock (rate, ETA) started after the step that compiled the program, not before."""
  _, _, err = interrupted
  for stage in ("wrappers", "all"):
    first = re.search(rf"stage {stage}:\s+\d+%\|[^|]*\| (\d+)/\d+ ", err)
    assert first and first.group(1) == "1", err[-3000:]
  for split in ("train", "eval"):  # the teacher cache's bars: rows of the first step done
    first = re.search(rf"caching \S+/cache/{split}:\s+\d+%\|[^|]*\| (\d+)/\d+ ", err)
    assert first and int(first.group(1)) > 0, err[-3000:]


@pytest.fixture(scope="module")
def rerun(tiny, interrupted):
  """The rerun (stage `all` cut short so that it ends), with no MPLCONFIGDIR and a TMPDIR of
  its own."""
  tmp, cfg = tiny
  e = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
  (tmp / "tmpdir").mkdir()
  e["TMPDIR"] = str(tmp / "tmpdir")
  r = subprocess.run([sys.executable, "-m", "moedistill.train", f"--config={cfg}",
                      "--config.stages.all.steps=3"], capture_output=True, text=True, env=e,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return tmp, r


def test_resume_line_names_the_stage(rerun):
  tmp, r = rerun
  assert f"resumed from {tmp / 'run' / 'checkpoints' / '3'} (stage wrappers, step 3)" \
      in r.stdout, r.stdout


def test_stdout_ends_with_the_table(rerun):
  tmp, r = rerun
  lines = r.stdout.strip().splitlines()
  assert lines[-4].startswith("held-out") and lines[-1].startswith("distilled student"), \
      r.stdout[-3000:]
  assert '"student_distilled"' not in r.stdout  # the report's JSON is in the file only
  assert (tmp / "run" / "report.json").exists()


def test_matplotlib_cache_is_not_in_the_workdir(rerun):
  tmp, _ = rerun
  assert (tmp / "run" / "loss_curves.png").exists()
  assert not (tmp / "run" / ".matplotlib").exists()
  assert (tmp / "tmpdir" / f"moedistill-matplotlib-{os.getuid()}").is_dir()


def test_reason_keeps_the_first_line_whole():
  """errors.reason, which every refusal quoting a library's error uses: the first line in
  full (no cut mid-word, however long), TensorStore's trailing payloads dropped."""
  from moedistill.errors import reason
  long = "DATA_LOSS: Error reading chunk: Truncated Zstd-compressed frame " + "x " * 200
  assert reason(ValueError(long + "\nsecond line")) == long.strip()
  assert reason(ValueError('NOT_FOUND: no "zarr.json" [tensorstore_spec=\'{"a": 1}\'] '
                           "[source locations='x.cc:1']")) == 'NOT_FOUND: no "zarr.json"'
  assert reason(ValueError("a list [1, 2] stays")) == "a list [1, 2] stays"
  assert reason(OSError()) == "OSError"
