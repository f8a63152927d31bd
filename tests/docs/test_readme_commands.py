"""Every command in README.md and docs/*.md, so the docs cannot drift from the code. What
"checked" means for each kind of command (none but the demo's does real work here):

- Shell code blocks: each `python -m moedistill.<command> ...` runs parse-only with the same
  flags through `moedistill.params`, which reads the config, every override and the teacher's
  config.json, builds the student's full structure abstractly and checks every stage's groups,
  loading no weights. A teacher path that does not exist here (the "A real model" block's
  /models/Qwen3-30B-A3B) becomes a directory holding Qwen3-30B-A3B's real config.json.
  `moedistill.plan` is not run here: at that size it compiles for minutes on 2 cores (the
  teacher-cache forward alone took 116 s), beyond this suite's budget.
  The demo command does real work in tests/commands/test_demo.py (same command and config, fewer rows
  and steps); `bash scripts/test.sh` is this suite; installs and downloads (venv, pip, hf) are
  not run. Any other command fails the test until it is classified here.
- Inline `--config.<field>=<value>` examples in the prose (but Troubleshooting's refusals):
  all parsed in one run.
- The commands table: one row per command module, and every flag a row names is defined.
- The parameter-group examples (python block): each is a valid `groups` for the demo student.
"""
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
TEXT = "\n".join([README, *DOCS.values()])
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", TEXT, re.S)
# The prose outside code blocks, less the troubleshooting page (whose examples are refusals).
PROSE = re.sub(r"```.*?```", "", "\n".join(
    [README, *(t for n, t in DOCS.items() if n != "troubleshooting.md")]), flags=re.S)
NOT_RUN = {"setup": "installs or downloads", "suite": "this test suite",
           "demo": "tests/commands/test_demo.py runs it"}


def shell_commands():
  """Each command of the bash blocks as an argv list (continuations joined, comments and
  `&&` split off)."""
  out = []
  for lang, body in BLOCKS:
    if lang != "bash":
      continue
    for line in body.replace("\\\n", " ").splitlines():
      tokens = shlex.split(line, comments=True)
      while tokens:
        cut = tokens.index("&&") if "&&" in tokens else len(tokens)
        out.append(tokens[:cut])
        tokens = tokens[cut + 1:]
  return out


def kind(argv) -> str:
  if argv[0] in ("hf", "pip") or argv[0].endswith("/pip") or argv[1:3] == ["-m", "venv"]:
    return "setup"
  if argv[:2] == ["bash", "scripts/test.sh"]:
    return "suite"
  if Path(argv[0]).name.startswith("python") and argv[1] == "-m" and \
      argv[2].startswith("moedistill."):
    return "demo" if argv[2:] == ["moedistill.train", "--config=configs/two_stage.py"] \
        else "moedistill"
  if argv[0] == "bash" and argv[1].startswith("scripts/") or argv[:2] == ["python", "-m"] \
      and argv[2].startswith("benchmarks") or argv[0] == "python" and argv[1].startswith(
          "scripts/"):
    return "script"
  raise AssertionError(f"docs command not classified by this test: {shlex.join(argv)}")


def qwen3_30b_a3b_dir(tmp_path) -> Path:
  """Qwen3-30B-A3B's config.json (the hub's values), written by transformers; no weights."""
  from transformers import Qwen3MoeConfig
  d = tmp_path / "Qwen3-30B-A3B"
  d.mkdir(exist_ok=True)
  Qwen3MoeConfig(
      vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
      num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
      num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
      rope_theta=1_000_000.0, max_position_embeddings=40960, bos_token_id=151643,
      eos_token_id=151645, tie_word_embeddings=False).to_json_file(d / "config.json")
  return d


def parse_only(flags, tmp_path, module="moedistill.params"):
  """`moedistill.params` (or `module`) with the command's flags, a teacher path that does not
  exist here replaced by Qwen3-30B-A3B's config.json."""
  argv = []
  for f in flags:
    name, _, value = f.partition("=")
    if name == "--config.teacher" and not Path(value).is_dir():
      f = f"{name}={qwen3_30b_a3b_dir(tmp_path)}"
    argv.append(f)
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=600)


def test_every_shell_command_is_classified():
  kinds = [kind(c) for c in shell_commands()]
  assert kinds.count("moedistill") >= 1 and kinds.count("demo") == 1, kinds


@pytest.mark.slow
@pytest.mark.parametrize("argv", [c for c in shell_commands() if kind(c) == "moedistill"],
                         ids=lambda c: c[2])
def test_readme_command_parses(argv, tmp_path):
  if argv[2] == "moedistill.sweep":  # its own flags: it checks every point, trains nothing
    r = parse_only([*argv[3:], "--sweep.check_only"], tmp_path, "moedistill.sweep")
  else:
    r = parse_only(argv[3:], tmp_path)
  assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stderr[-3000:]}"
  if "qwen3_30b_a3b" in argv[3]:
    assert "layers.47.mlp.experts.wrapper.down_b" in r.stdout  # the 48-layer config was read


@pytest.mark.slow
def test_prose_overrides_parse(tmp_path):
  found = re.findall(r"(--config\.[\w.]+)=('[^']*'|[^\s`]+)", PROSE)
  assert len(found) >= 4, found
  overrides = [f"{name}={value.strip(chr(39)).replace(chr(10), ' ')}" for name, value in found]
  # A packed cache, a sampled cache and the other settings (several temperatures) exclude
  # each other: one run each.
  sampled = ("--config.cache.mode", "--config.cache.samples", "--config.cache.exact_k",
             "--config.train.kd_mode")
  for group in ([o for o in overrides if not o.startswith(("--config.cache.format", *sampled))],
                [o for o in overrides if o.startswith("--config.cache.format")],
                [o for o in overrides if o.startswith(sampled)]
                + ["--config.cache.temperatures=1"]):
    r = parse_only(["--config=configs/two_stage.py", *group], tmp_path)
    assert r.returncode == 0, f"{group}\n{r.stderr[-3000:]}"


@functools.cache
def help_text(module: str = "", script: str = "") -> str:
  """`--helpfull` of a module (or `--help` of a script), once per module for the file."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  argv = ["-m", module, "--helpfull"] if module else [script, "--help"]
  r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                     timeout=300, cwd=REPO)
  return r.stdout + r.stderr


def table_rows(text=TEXT):
  return re.findall(r"^\| `python -m (moedistill\.\w+)([^`]*)` \|", text, re.M)


@pytest.mark.parametrize("text", [README, DOCS["configuration.md"]], ids=["README", "docs"])
def test_table_lists_every_command(text):
  commands = {f"moedistill.{p.stem}" for p in (REPO / "moedistill").glob("*.py")
              if 'if __name__ == "__main__":' in p.read_text()}
  assert {m for m, _ in table_rows(text)} == commands


@pytest.mark.slow
@pytest.mark.parametrize("module,flags", sorted(set(table_rows())),
                         ids=lambda x: x if "." in x else "")
def test_table_flags_are_defined(module, flags):
  text = help_text(module)
  for name in re.findall(r"--([\w.]+)", flags):
    assert re.search(rf"--(\[no\])?{re.escape(name)}:", text), f"{module} has no --{name}"


@pytest.mark.parametrize("literal", [l.split("#")[0].strip() for lang, body in BLOCKS
                                     if lang == "python" for l in body.splitlines() if l.strip()])
def test_group_examples_are_valid(literal):
  """Each README group list, given as an override, covers the demo student's params."""
  import importlib.util
  from moedistill.cli import ListParser
  from moedistill.config import job_from_config
  from moedistill.model.config import ModelConfig
  from moedistill.model.shared_core import Compression
  from moedistill.training import optim, param_tree
  spec = importlib.util.spec_from_file_location("two_stage", REPO / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.stages.all.groups = ListParser().parse(literal)
  job = job_from_config(c)
  cfg = ModelConfig.from_json_file(Path(job.teacher, "config.json"))
  paths = list(param_tree.shapes(param_tree.abstract_student(cfg, Compression(*job.ranks))))
  stage = {s.name: s for s in job.train.stages}["all"]
  assert len(optim.assign(paths, stage.groups, "groups")) == len(paths)


def inline_commands():
  """Commands quoted inline (`python scripts/x.py --flag ...`, `python -m moedistill.x ...`,
  `bash scripts/x.sh`) in README.md and docs/*.md, outside code blocks."""
  prose = re.sub(r"```.*?```", "", TEXT, flags=re.S)
  spans = re.findall(r"`((?:python|bash) [^`]+)`", prose.replace("\n  ", " ").replace("\n", " "))
  return sorted({s for s in spans if re.match(r"(python|bash) (-m \w|scripts/|benchmarks)", s)})


def _script_and_flags(cmd):
  argv = shlex.split(cmd.replace("...", "X"))
  if argv[0] == "bash":
    return None, argv[1] if argv[1] != "scripts/test.sh" else None, []
  module = argv[2] if argv[1] == "-m" else None
  script = None if module else argv[1]
  return module, script, re.findall(r"(?<![\w-])--([\w.]+)", cmd)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", inline_commands())
def test_inline_command_names_real_flags(cmd):
  """The script or module exists and defines every flag the docs give it."""
  module, script, names = _script_and_flags(cmd)
  if script:
    assert (REPO / script).is_file(), f"{script} does not exist"
  if not names or (script and script.endswith(".sh")):
    return
  text = help_text(module or "", script or "")
  for name in names:
    if name.startswith("config.") or name in ("config", "xla_force_host_platform_device_count"):
      continue
    assert re.search(rf"--(\[no\])?{re.escape(name)}\b", text), f"{cmd}: no --{name}"
