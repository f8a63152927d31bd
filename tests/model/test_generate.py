"""KV-cached decoding (moedistill.model.decode) and the generate command: greedy tokens equal
transformers' generate(do_sample=False) token for token, on the embedded teacher and on a
rank-4 student exported to HF merged format, for a batch of prompts of different lengths with
rows ending at EOS at different steps; sampling is reproducible from its key and stays in the
top_p nucleus; the command on a 4-device fsdp x expert mesh gives the single-device tokens;
bad flags are refused in one line."""
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_cli, with_devices
from moedistill import compress, export, generate
from moedistill.errors import UserError
from moedistill.hub import hf
from moedistill.model import decode
from moedistill.model.shared_core import Compression

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

TEACHER = Path(generate.__file__).parent / "assets" / "tiny_teacher"
# Different lengths (4, 7 and 2 tokens); greedily the teacher ends the third at EOS after 5
# new tokens and runs the others past N (test_greedy_* assert both happen).
PROMPTS = ["12 + 7 =", "the cat sat on", "(["]
N = 14
_PROGRAMS = {}


def _program(graphdef, n, greedy):
  """One jitted decode per (graphdef, n, greedy): the teacher and the merged export share a
  graphdef (same config, plain experts), so they share one compiled program."""
  key = (graphdef, n, greedy)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = jax.jit(lambda st, t, l, k, temp, p, eos: decode.generate(
        nnx.merge(graphdef, st), t, l, n, k, greedy=greedy, temperature=temp, top_p=p,
        eos_ids=eos, pad_id=1))
  return _PROGRAMS[key]


def _batch(ids):
  width = max(map(len, ids))
  tokens = np.ones((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  return jnp.asarray(tokens), jnp.asarray([len(x) for x in ids], jnp.int32)


def _generate(model, ids, n=N, greedy=True, seed=0, temperature=1.0, top_p=1.0, eos=(0,)):
  graphdef, state = nnx.split(model)
  tokens, lens = _batch(ids)
  out, lengths = _program(graphdef, n, greedy)(state, tokens, lens, jax.random.key(seed),
                                               jnp.float32(temperature), jnp.float32(top_p),
                                               jnp.asarray(eos, jnp.int32))
  return [list(map(int, np.asarray(out)[i, :int(lengths[i])])) for i in range(len(ids))]


@pytest.fixture(scope="module")
def tok():
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(TEACHER))


@pytest.fixture(scope="module")
def ids(tok):
  return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def teacher():
  return hf.load_model(TEACHER)[0]


def _transformers_greedy(path, ids, n=N):
  """Each prompt alone (batch 1, no padding): the reference continuation."""
  import torch
  from transformers import Qwen3MoeForCausalLM
  model = Qwen3MoeForCausalLM.from_pretrained(str(path)).eval()
  out = []
  with torch.no_grad():
    for x in ids:
      g = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=int),
                         do_sample=False, max_new_tokens=n, eos_token_id=0, pad_token_id=1)
      out.append(list(map(int, g[0])))
  return out


def test_greedy_equals_transformers_on_the_teacher(teacher, ids):
  ours = _generate(teacher, ids)
  assert ours == _transformers_greedy(TEACHER, ids)
  new = [len(o) - len(x) for o, x in zip(ours, ids)]
  # Rows end at different steps: one at EOS before N, one only at N (the loop's per-row stop).
  assert any(k < N and o[-1] == 0 for k, o in zip(new, ours)) and N in new, new
  assert len(set(map(len, ids))) == len(ids)


def test_greedy_equals_transformers_on_an_exported_student(tmp_path_factory, teacher, ids):
  tmp = tmp_path_factory.mktemp("student")
  student, _ = compress.compress_model(teacher, Compression(4, 4, 4))
  hf.save_model(student, tmp / "native", tokenizer_from=TEACHER)
  out = export.export(tmp / "native", tmp / "export", fmt="merged")
  merged, _ = hf.load_model(out)
  ours = _generate(merged, ids)
  assert ours == _transformers_greedy(out, ids)
  assert _generate(student, ids) == ours  # the native (shared-core) student decodes the same
  assert ours != _generate(teacher, ids)  # the student is not the teacher under another name
  # The command on the export (its tokenizer copied from the teacher) prints the same tokens.
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(out))
  (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  r = run_cli("moedistill.generate", f"--checkpoint={out}", f"--prompts={tmp / 'p.jsonl'}",
              f"--max_new_tokens={N}")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  rows = [json.loads(line) for line in lines[:-1]]
  assert [row["prompt"] for row in rows] == PROMPTS
  for row, o, x in zip(rows, ours, ids):
    assert row["new_tokens"] == len(o) - len(x)
    assert row["completion"] == tok.decode(o[len(x):], skip_special_tokens=True)
  assert lines[-1].startswith(f"# {len(PROMPTS)} prompts") and "tokens/s" in lines[-1]


def _mass_before(model, rows, ids, temperature):
  """For each sampled token (after its prompt): the probability mass of the tokens strictly
  more probable than it, from one plain full forward of the rows (padded at the end, which a
  causal model ignores)."""
  tokens = np.ones((len(rows), max(map(len, ids)) + N), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  logits = np.asarray(model(jnp.asarray(tokens))[0], np.float64) / temperature
  out = []
  for i, (row, x) in enumerate(zip(rows, ids)):
    for s in range(len(x), len(row)):
      p = np.exp(logits[i, s - 1] - logits[i, s - 1].max())
      p /= p.sum()
      out.append(p[p > p[row[s]]].sum())
  return np.array(out)


def test_sampling_is_reproducible_and_top_p_restricts_support(teacher, ids):
  kw = dict(greedy=False, temperature=2.0)
  a = _generate(teacher, ids, seed=3, **kw)
  assert a == _generate(teacher, ids, seed=3, **kw)
  assert a != _generate(teacher, ids, seed=4, **kw)
  # A vanishing nucleus is the top token alone: sampling reproduces greedy.
  assert _generate(teacher, ids, seed=3, top_p=1e-6, **kw) == _generate(teacher, ids)
  top_p = 0.5
  inside = _mass_before(teacher, _generate(teacher, ids, seed=5, top_p=top_p, **kw), ids, 2.0)
  assert len(inside) >= N and inside.max() < top_p + 1e-4
  free = _mass_before(teacher, a, ids, 2.0)
  assert free.max() >= top_p  # without top_p, tokens outside the nucleus do come up


def test_sample_nucleus_keeps_the_crossing_token():
  # probs 0.5, 0.3, 0.2: top_p=0.6 keeps the first two (0.5 < 0.6, then 0.8 crosses it).
  logits = jnp.log(jnp.asarray([[0.2, 0.5, 0.3]]))
  drawn = {int(decode.sample(logits, jax.random.key(s), False, 1.0, 0.6)[0]) for s in range(64)}
  assert drawn == {1, 2}


def _flags(**kw):
  base = dict(prompt="x", prompts=None, max_new_tokens=4, temperature=0.0, top_p=1.0,
              batch_size=0)
  return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(prompts="p.jsonl"), "exactly one of --prompt"),
    (dict(prompt=None), "exactly one of --prompt"),
    (dict(max_new_tokens=0), "--max_new_tokens=0"),
    (dict(temperature=-1.0), "--temperature=-1.0"),
    (dict(temperature=float("nan")), "--temperature=nan"),
    (dict(top_p=1.5), "--top_p=1.5"),
    (dict(batch_size=-1), "--batch_size=-1"),
])
def test_check_flags_refuses(kw, match):
  with pytest.raises(UserError, match=match.replace("(", r"\(")):
    generate.check_flags(_flags(**kw))
  generate.check_flags(_flags())  # the defaults pass


def test_bad_flags_exit_2_with_one_line(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
  cases = [([f"--checkpoint={TEACHER}", "--prompt=x", "--top_p=0"], "--top_p=0.0"),
           ([f"--checkpoint={tmp_path}", f"--prompts={tmp_path / 'bad.jsonl'}"], "line 2")]
  for args, match in cases:
    r = run_cli("moedistill.generate", *args)
    assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_command_on_a_sharded_mesh_gives_the_single_device_tokens(tmp_path, teacher, tok, ids):
  """4 forced CPU devices, fsdp=2 x expert=2: params sharded, the batch split over 4 shards,
  the MoE layers in expert parallelism (shard_map, all-to-all), the same greedy tokens."""
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  config = Path(__file__).resolve().parents[2] / "configs" / "two_stage.py"
  r = run_cli("moedistill.generate", f"--config={config}", "--config.mesh.fsdp=2",
              "--config.mesh.expert=2", f"--config.workdir={tmp_path / 'run'}",
              f"--checkpoint={TEACHER}", f"--prompts={tmp_path / 'p.jsonl'}",
              f"--max_new_tokens={N}",
              env={"XLA_FLAGS": with_devices(4)})
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert "batch 4," in lines[-1]  # 3 prompts padded to the mesh's 4 batch shards
  got = [json.loads(line)["completion"] for line in lines[:-1]]
  want = [tok.decode(o[len(x):], skip_special_tokens=True)
          for o, x in zip(_generate(teacher, ids), ids)]
  assert got == want
