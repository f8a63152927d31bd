"""The tokens phase: equal to a plain reference packing, the same for 2 processes as for 1,
bit-identical after SIGKILLs, `max_rows` stops early, cheap fingerprint checks, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import WORDS, job_config, make_tokenizer, run_cli, write_config_file
from moedistill.data import cache, sources, tokens
from moedistill.data.sources import DataSpec
from moedistill.errors import ConfigError, UserError

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

L = 16


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  make_tokenizer(path)
  return str(path)


def write_jsonl(path, n_docs, seed, extra=()):
  r = np.random.RandomState(seed)
  docs = [" ".join(r.choice(WORDS, int(r.randint(1, 30)))) for _ in range(n_docs)] + list(extra)
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  return str(path)


def reference_rows(files, tok_dir, block, max_rows=0):
  """Plain reference: each file's lines grouped by the byte block they start in, every group
  tokenized by transformers and packed alone (documents + EOS, last row padded)."""
  tok = sources.load_tokenizer(tok_dir)
  rows_t, rows_s = [], []
  for f in files:
    raw, groups, pos = open(f, "rb").read(), {}, 0
    for line in raw.splitlines(keepends=True):
      groups.setdefault(pos // block, []).append(json.loads(line)["text"])
      pos += len(line)
    for g in sorted(groups):
      ids = [x for x in tok(groups[g], add_special_tokens=False)["input_ids"] if x]
      flat = [t for d in ids for t in d + [tok.eos_token_id]]
      seg = [i + 1 for i, d in enumerate(ids) for _ in range(len(d) + 1)]
      n = -(-len(flat) // L)
      t = np.full(n * L, tok.eos_token_id, np.int32)
      s = np.zeros(n * L, np.int32)
      t[:len(flat)], s[:len(flat)] = flat, seg
      t, s = t.reshape(n, L), s.reshape(n, L)
      for r in range(n):  # renumber per row, as the original packer did
        nz = s[r] > 0
        s[r, nz] = np.unique(s[r, nz], return_inverse=True)[1] + 1
      rows_t.append(t)
      rows_s.append(s)
  t, s = np.concatenate(rows_t), np.concatenate(rows_s)
  return (t[:max_rows], s[:max_rows]) if max_rows else (t, s)


def read_tokens(path):
  meta = cache.read_metadata(path, tokens.META)
  arrays = cache.open_arrays(path, meta, layout=cache.token_layout(
      meta["rows"], meta["seq_len"], meta["rows_per_chunk"]))
  return meta, arrays["tokens"].read().result(), arrays["segment_ids"].read().result()


def build(files, tok_dir, path, block=2048, max_rows=0, R=4, **kw):
  spec = DataSpec(source=tuple(files), tokenizer=tok_dir, seq_len=L, block_bytes=block,
                  max_rows=max_rows)
  return tokens.build(spec, str(path), sources.load_tokenizer(tok_dir), rows_per_chunk=R,
                      codec="zstd", progress=False, **kw)


def test_matches_reference_and_counts_odd_documents(tmp_path, tok_dir):
  long_doc = " ".join(["seven"] * 40)  # longer than a row: continues over the next rows
  files = [write_jsonl(tmp_path / "a.jsonl", 300, 0, extra=["", long_doc]),
           write_jsonl(tmp_path / "b.jsonl", 50, 1)]
  (tmp_path / "empty.jsonl").write_text("")
  meta = build(files + [str(tmp_path / "empty.jsonl")], tok_dir, tmp_path / "store")
  ref_t, ref_s = reference_rows(files, tok_dir, 2048)
  _, got_t, got_s = read_tokens(str(tmp_path / "store"))
  np.testing.assert_array_equal(got_t, ref_t)
  np.testing.assert_array_equal(got_s, ref_s)
  assert meta["pieces"] > 4 and meta["rows"] == len(ref_t)
  tok = sources.load_tokenizer(tok_dir)
  texts = [json.loads(x)["text"] for f in files for x in open(f)]
  lens = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
  st = meta["stats"]
  assert (st["empty_docs"], st["empty_files"], st["docs"]) == (1, 1, 351)
  assert st["long_docs"] == sum(n + 1 > L for n in lens) >= 1
  assert st["tokens"] == sum(n + 1 for n in lens if n)
  assert not list((tmp_path / "store").glob("staging/*"))  # staging removed when complete


def test_parquet_and_hub_streaming_equal_jsonl(tmp_path, tok_dir, monkeypatch):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  files = [write_jsonl(tmp_path / f"{i}.jsonl", 80, i) for i in range(2)]
  ref = build(files, tok_dir, tmp_path / "ref", block=10**9)
  for i, f in enumerate(files):
    texts = [json.loads(x)["text"] for x in open(f)]
    pq.write_table(pa.table({"text": texts}), tmp_path / f"{i}.parquet", row_group_size=1000)
  build([str(tmp_path / f"{i}.parquet") for i in range(2)], tok_dir, tmp_path / "pq")
  real = datasets.load_dataset
  monkeypatch.setattr(datasets, "load_dataset", lambda name, cfg, split, streaming, revision: real(
      "json", data_files=files, split=split, streaming=streaming))  # a hub dataset of 2 files
  build(["org/dataset"], tok_dir, tmp_path / "hub")
  _, t, s = read_tokens(str(tmp_path / "ref"))
  for other in ("pq", "hub"):
    _, t2, s2 = read_tokens(str(tmp_path / other))
    np.testing.assert_array_equal(t2, t)
    np.testing.assert_array_equal(s2, s)
  assert ref["rows"] == len(t)


def corpus_config(tmp_path, teacher, n_files=3, docs=400, block=1024):
  files = [write_jsonl(tmp_path / f"c{i}.jsonl", docs, 10 + i) for i in range(n_files)]
  c = job_config(tmp_path, teacher, **{"data.block_bytes": block})
  c.data.train.source = files
  return c, files


def test_two_processes_equal_one(tmp_path, teacher_dir):
  from test_cache import run_two_processes
  c, files = corpus_config(tmp_path, teacher_dir[0])
  run_two_processes("moedistill.cache_logits", write_config_file(tmp_path, c), "--split=train",
                    "--phase=tokens")
  meta, t, s = read_tokens(str(tmp_path / "run" / "cache" / "train"))
  ref_t, ref_s = reference_rows(files, str(teacher_dir[0]), 1024)
  np.testing.assert_array_equal(t, ref_t)
  np.testing.assert_array_equal(s, ref_s)
  assert meta["complete"] and meta["pieces"] > 20


def test_sigkill_resumes_bit_identically(tmp_path, teacher_dir):
  c, files = corpus_config(tmp_path, teacher_dir[0], n_files=3, docs=800, block=512)
  c.cache.rows_per_chunk = 8
  cfg = write_config_file(tmp_path, c)
  store = tmp_path / "run" / "cache" / "train"
  progress = lambda: len(list(store.glob("staging/*.json"))) + len(  # noqa: E731
      list(store.glob("tokens_done/c/*")))
  rng, seen, killed = np.random.default_rng(1), [], 0
  for _ in range(2):  # kill at seeded random points of progress
    target = progress() + int(rng.integers(20, 100))
    p = subprocess.Popen([sys.executable, "-m", "moedistill.cache_logits", f"--config={cfg}",
                          "--split=train", "--phase=tokens"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    while p.poll() is None and progress() < target:
      time.sleep(0.01)
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
      killed += 1
    p.wait()
    seen.append(progress())
  r = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=train", "--phase=tokens")
  assert r.returncode == 0, r.stderr[-2000:]
  print("staged pieces + assembled chunks after each kill:", seen)
  assert killed == 2 and 0 < seen[0] < seen[-1], seen
  meta, t, s = read_tokens(str(store))
  ref_t, ref_s = reference_rows(files, str(teacher_dir[0]), 512)
  np.testing.assert_array_equal(t, ref_t)
  np.testing.assert_array_equal(s, ref_s)


class Killed(Exception):
  pass


def test_staged_and_direct_pieces_assemble_and_resume_with_another_process_count(
    tmp_path, tok_dir, monkeypatch):
  """A first run plays 2 processes: process 1 stages its pieces (their offsets are not known
  yet), then process 0 writes its own straight to the final arrays (every earlier piece is
  done by then), and assembly stops after process 0 of 2 marked its half. A 1-process rerun
  copies and marks only the other mark chunks (whole `tokens_done` chunks, one write each),
  and the rows equal the reference."""
  monkeypatch.setattr(cache, "TOKEN_MARKS_PER_CHUNK", 4)
  files = [write_jsonl(tmp_path / "a.jsonl", 300, 3)]
  marked, real = [], tokens._mark
  monkeypatch.setattr(tokens, "_mark", lambda m, w, lo, hi: marked.append((lo, hi)) or real(
      m, w, lo, hi))
  stage, assemble, kinds = tokens.stage_mine, tokens.assemble_mine, []

  def as_two(path, spec, plist, tok, arrays, R, p, P, progress):
    for q in (1, 0):
      stage(path, spec, plist, tok, arrays, R, q, 2, progress)

  def killed(path, meta, records, p, P):
    kinds.extend("at" in r for r in records)
    assemble(path, meta, records, 0, 2)
    raise Killed

  monkeypatch.setattr(tokens, "stage_mine", as_two)
  monkeypatch.setattr(tokens, "assemble_mine", killed)
  with pytest.raises(Killed):
    build(files, tok_dir, tmp_path / "s")
  first = list(marked)
  monkeypatch.setattr(tokens, "stage_mine", stage)
  monkeypatch.setattr(tokens, "assemble_mine", assemble)
  meta = build(files, tok_dir, tmp_path / "s")
  assert kinds[::2] == [True] * len(kinds[::2]) and not any(kinds[1::2])  # direct / staged
  n_marks = -(-meta["rows"] // 4 // 4)
  assert n_marks >= 8 and first == [(4 * b, 4 * b + 4) for b in range(n_marks // 2)]
  assert sorted(marked) == [(4 * b, min(4 * b + 4, -(-meta["rows"] // 4)))
                            for b in range(n_marks)]  # each mark chunk written once
  assert len(list((tmp_path / "s").glob("tokens_done/c/*"))) == n_marks
  ref_t, ref_s = reference_rows(files, tok_dir, 2048)
  _, t, s = read_tokens(str(tmp_path / "s"))
  np.testing.assert_array_equal(t, ref_t)
  np.testing.assert_array_equal(s, ref_s)


def test_kills_while_making_and_cutting_the_arrays_resume(tmp_path, tok_dir, monkeypatch):
  """Killed after only the first final array was created, then killed between cutting the
  arrays to the row count and recording it: each rerun goes on, and the rows are right."""
  files = [write_jsonl(tmp_path / "a.jsonl", 300, 4)]
  real_open, real_write = cache.open_arrays, cache.write_metadata

  def first_array_only(path, meta, create=False, names=None, **kw):
    if create and names == ["segment_ids"]:
      raise Killed
    return real_open(path, meta, create=create, names=names, **kw)

  def not_the_row_count(path, meta, name="metadata.json"):
    if name == tokens.META and "rows" in meta and not meta["complete"]:
      raise Killed
    return real_write(path, meta, name)

  for patch in (("open_arrays", first_array_only), ("write_metadata", not_the_row_count)):
    monkeypatch.setattr(cache, *patch)
    with pytest.raises(Killed):
      build(files, tok_dir, tmp_path / "s")
    monkeypatch.undo()
  assert list((tmp_path / "s").glob("staging/*.json"))  # the second run recorded its pieces
  build(files, tok_dir, tmp_path / "s")
  ref_t, ref_s = reference_rows(files, tok_dir, 2048)
  _, t, s = read_tokens(str(tmp_path / "s"))
  np.testing.assert_array_equal(t, ref_t)
  np.testing.assert_array_equal(s, ref_s)


def test_max_rows_reads_only_what_it_needs(tmp_path, tok_dir, monkeypatch):
  """max_rows=50 tokenizes a prefix of the pieces, no more than it needs (counted, not
  timed: a wall-clock ratio is flaky under load)."""
  files = [write_jsonl(tmp_path / f"m{i}.jsonl", 4000, i) for i in range(4)]
  read, real = [], tokens.stage_piece
  monkeypatch.setattr(tokens, "stage_piece", lambda path, g, *a: read.append(g) or
                      real(path, g, *a))
  full = build(files, tok_dir, tmp_path / "full", block=32768, R=64)
  all_pieces, read[:] = list(read), []
  few = build(files, tok_dir, tmp_path / "few", block=32768, max_rows=50, R=64)
  assert few["rows"] == 50 and full["rows"] > 50
  assert read == list(range(len(read))) and 1 <= len(read) < len(all_pieces) / 4, \
      (read, len(all_pieces))
  _, t, s = read_tokens(str(tmp_path / "few"))
  _, ft, fs = read_tokens(str(tmp_path / "full"))
  np.testing.assert_array_equal(t, ft[:50])
  np.testing.assert_array_equal(s, fs[:50])


def test_changed_file_detected_without_rehashing_others(tmp_path, tok_dir, monkeypatch):
  files = [write_jsonl(tmp_path / f"f{i}.jsonl", 30, i) for i in range(3)]
  spec = DataSpec(source=tuple(files), tokenizer=tok_dir, seq_len=L, block_bytes=2048)
  build(files, tok_dir, tmp_path / "s")
  hashed = []
  real = sources.file_sha
  monkeypatch.setattr(sources, "file_sha", lambda p: hashed.append(p) or real(p))
  path = str(tmp_path / "s")
  assert tokens.finished(spec, path, 4, "zstd")["complete"] and hashed == []
  with open(files[1], "a") as f:
    f.write(json.dumps({"text": "one more document"}) + "\n")
  with pytest.raises(UserError, match="different data_fingerprint"):
    tokens.finished(spec, path, 4, "zstd")
  assert hashed == [files[1]]
  hashed.clear()
  with pytest.raises(UserError, match="different data_fingerprint"):
    tokens.finished(spec, path, 4, "zstd", verify=True)
  assert hashed == files


@pytest.mark.parametrize("name,content,expected", [
    ("utf8", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "bad.jsonl line 2 is not valid UTF-8"),
    ("field", b'{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n',
     "data.text_field='text' not in {f} line 3; keys are ['body']"),
    ("json", b'{"text": "a"}\n{"text": \n', "bad.jsonl line 2 is not valid JSON"),
    ("type", b'{"text": 5}\n', "line 1 is a int, expected a string"),
    ("all_empty", b'{"text": ""}\n', "no rows after tokenization"),
])
def test_bad_records_name_file_and_line(tmp_path, tok_dir, name, content, expected):
  f = tmp_path / "bad.jsonl"
  f.write_bytes(content)
  with pytest.raises(ConfigError) as e:
    build([str(f)], tok_dir, tmp_path / "s")
  assert expected.format(f=f) in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_parquet_column_not_text(tmp_path, tok_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  f = tmp_path / "n.parquet"
  pq.write_table(pa.table({"text": [1, 2]}), f)
  with pytest.raises(ConfigError, match=f"'text' in {f} is a int64 column, expected strings"):
    build([str(f)], tok_dir, tmp_path / "s")
  assert not os.path.exists(tmp_path / "s")


def test_precheck_writes_nothing(tmp_path, tok_dir):
  f = tmp_path / "bad.jsonl"
  f.write_bytes(b'{"body": "x"}\n')
  with pytest.raises(ConfigError, match="line 1"):
    build([str(f)], tok_dir, tmp_path / "s")
  assert not os.path.exists(tmp_path / "s")
