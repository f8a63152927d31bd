"""The report's generation metric (moedistill/training/gen_eval.py): held-out prompts of the demo
corpus's four tasks with their forced answers, the exact-match scorer, and the embedded teacher
against its zero-shot student."""
import json
from pathlib import Path

import pytest

from moedistill.data import corpus
from moedistill.training import gen_eval as G

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "moedistill" / "assets" / "tiny_teacher"
CORPUS = REPO / "moedistill" / "assets" / "corpus"
EOS = "<eos>"


@pytest.fixture(scope="module")
def settings():
  return G.demo_corpus(TEACHER)


@pytest.fixture(scope="module")
def items(settings):
  return G.held_out_items(64, settings)


def _texts(name):
  return [json.loads(line)["text"] for line in (CORPUS / f"{name}.jsonl").read_text().splitlines()]


def test_items_are_deterministic_balanced_and_cut_from_unseen_held_out_documents(settings, items):
  assert settings == {"train_docs": 30000, "train_seed": 1, "heldout_docs": 400, "heldout_seed": 2}
  assert G.held_out_items(64, settings) == items
  assert [it.task for it in items[:8]] == list(G.TASKS) * 2  # tasks in turn, 16 each
  assert all(sum(it.task == t for it in items) == 16 for t in G.TASKS)
  assert G.held_out_items(6, settings) == items[:6]  # fewer prompts: each task's first ones
  held = _texts("heldout")
  stream = corpus.documents(max(len(held), max(it.doc for it in items) + 1),
                            settings["heldout_seed"])
  assert stream[:len(held)] == held  # the stream's first documents are the eval split
  train = set(_texts("train"))  # the committed training documents, read from the file
  for it in items:
    doc = stream[it.doc]
    assert doc not in train
    whole = f"{it.prompt} {it.answer}"
    assert doc == whole if it.eos else (doc + " ").startswith(whole + " ")  # word-aligned


def _possible_next(toks):
  """Every token the bracket grammar allows after `toks` (the brackets of a document so far),
  EOS included, by matching the grammar itself: seq(d) = group(d) [group(d)], group(d) = open
  [seq(d+1) if d < 3] matching-close (an independent reading of corpus._brackets)."""
  n, close = len(toks), dict(corpus.BRACKETS)

  def group(i, d):
    if i == n:
      return set(), set(close)
    if toks[i] not in close:
      return set(), set()
    mids, nxt = {i + 1}, set()
    if d < 3:
      e, x = seq(i + 1, d + 1)
      mids |= e
      nxt |= x
    ends = set()
    for m in mids:
      if m == n:
        nxt.add(close[toks[i]])
      elif toks[m] == close[toks[i]]:
        ends.add(m + 1)
    return ends, nxt

  def seq(i, d):
    ends, nxt = group(i, d)
    for j in list(ends):
      e, x = group(j, d)
      ends |= e
      nxt |= x
    return ends, nxt

  ends, nxt = seq(0, 0)
  return nxt | ({EOS} if n in ends else set())


def test_answers_are_right_by_independent_computation(items):
  world = corpus.world()
  for it in items:
    w, a = it.prompt.split(), it.answer.split()
    if it.task == "arithmetic":  # "a + b =" / "a - b =" -> "<value> ."
      assert w[-1] == "=" and a == [str(eval(" ".join(w[:-1]))), "."] and not it.eos
    elif it.task == "facts":
      if w[0] == "the":  # the <pet> of <name> is -> <color> .
        assert w[1] == world[w[3]][2] and a == [world[w[3]][1], "."]
      else:
        city, color, pet = world[w[0]]
        assert a == {"lives in": [city, "."], "is from": [city, "."],
                     "has a": [color, pet, "."]}[" ".join(w[1:])]
    elif it.task == "grammar":  # a complete sentence but its full stop; a second one follows
      assert w[0] == "the" and w[-1] in corpus.NOUNS and a == [".", "the"]
    else:  # the longest run of brackets the grammar forces, then EOS if forced
      assert w[:2] == ["brackets", ":"]
      toks, forced = w[2:], []
      while len(nxt := _possible_next(toks)) == 1:
        (t,) = nxt
        forced.append(t)
        if t == EOS:
          break
        toks = toks + [t]
      assert a and forced == a + [EOS] * it.eos
  # every task has answers of more than one value (not a constant the scorer could match)
  for t in G.TASKS:
    assert len({it.answer for it in items if it.task == t}) > 1 or t == "grammar"


def test_scorer_matches_exactly_on_a_hand_made_case():
  it = lambda task, answer, eos=False: G.Item(task, "p", answer, eos, 0)  # noqa: E731
  items = [it("arithmetic", "19 ."), it("arithmetic", "19 ."), it("arithmetic", "19 ."),
           it("brackets", ")", True), it("brackets", ")", True), it("facts", "red cat .")]
  answers = [[147, 7], [147, 7], [147, 7], [4, 0], [4, 0], [121, 103, 7]]
  continuations = [
      [147, 7, 143, 5],   # the answer, then free tokens: a match
      [147, 143],         # no delimiter after 19: a miss
      [9, 17, 7],         # "1 9 .": other tokens: a miss
      [4, 0],             # the closer and the forced EOS: a match
      [4, 4, 0],          # no EOS after the forced closer: a miss
      [121, 103],         # stopped before the delimiter (EOS/length): a miss
  ]
  assert G.score(items, answers, continuations) == {
      "arithmetic": 1 / 3, "brackets": 0.5, "facts": 0.0, "overall": 2 / 6, "prompts": 6}


def _demo_job(**report):
  import importlib.util

  from moedistill.config import job_from_config
  spec = importlib.util.spec_from_file_location("two_stage", REPO / "configs" / "two_stage.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.report.update(report)
  return job_from_config(c)


def test_the_teacher_scores_well_above_its_zero_shot_student(tmp_path, capsys):
  """16 prompts, 4 per task, through the report's path (config.report.gen_prompts, the
  checkpoints as report.write_report passes them). Measured: teacher 1.0 on every task;
  zero-shot student 0.5625 overall (arithmetic 0.25, brackets 1.0, facts 0.25, grammar 0.75;
  native and merged alike). The student (the demo's rank-4 compression, saved native) is
  loaded merged, sharing the teacher's program."""
  from moedistill import compress
  from moedistill.hub import hf
  from moedistill.model.shared_core import Compression
  from moedistill.report import ROWS
  job = _demo_job(gen_prompts=16)
  assert job.gen_prompts == 16 and _demo_job(gen_prompts=0).gen_prompts == 0
  teacher, _ = hf.load_model(TEACHER)
  student, _ = compress.compress_model(teacher, Compression(*job.ranks))
  hf.save_model(student, tmp_path / "student_init", tokenizer_from=TEACHER)
  paths = {"teacher": job.teacher, "student_init": tmp_path / "student_init"}
  G._program.cache_clear()
  figures = G.report_figures(job, paths)
  assert G._program.cache_info().misses == 1  # one compiled program for both models
  t, s = figures["teacher"], figures["student_init"]
  assert set(t) == set(s) == {*G.TASKS, "overall", "prompts"} and t["prompts"] == 16
  assert t["overall"] >= 0.9 and s["overall"] <= t["overall"] - 0.3, (t, s)
  G.print_table({k: {"gen_exact_match": v} for k, v in figures.items()}, ROWS)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("greedy exact match (16)") and lines[0].split()[-5:] == [
      *G.TASKS, "overall"]
  assert lines[1].startswith("teacher") and lines[2].startswith("zero-shot student")
  assert float(lines[1].split()[-1]) == pytest.approx(t["overall"], abs=5e-4)
  # off: gen_prompts=0, or a teacher without the demo corpus's training.json
  off = _demo_job(gen_prompts=0)
  assert G.report_figures(off, paths) == {}
  import dataclasses
  other = tmp_path / "other_teacher"
  other.mkdir()
  assert G.report_figures(dataclasses.replace(job, teacher=str(other)), paths) == {}
