"""Teacher cache: matches a PyTorch oracle, resumes after SIGKILL to identical arrays, refuses
mismatched metadata, and reads batches as a pure function of (seed, step)."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port, job_config, run_cli, write_config_file
from moedistill.cache_logits import build_cache
from moedistill.config import job_from_config
from moedistill.data import cache
from moedistill.data.loader import Loader, Order
from moedistill.errors import UserError

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

NAMES = ("tokens", "segment_ids", "topk_idx", "topk_logit", "lse", "done")


def read_all(path):
  meta = cache.read_metadata(path)
  arrs = cache.open_arrays(path, meta)
  return meta, {n: arrs[n].read().result() for n in NAMES}


def test_cache_matches_pytorch_oracle(tmp_path, teacher_dir):
  import torch
  path, torch_model = teacher_dir
  job = job_from_config(job_config(tmp_path, path))
  out = build_cache(job, "train", progress=False)
  meta, a = read_all(out)
  assert meta["complete"] and a["done"].all()
  checked = 0
  for r in range(0, meta["rows"], 7):
    for s in np.unique(a["segment_ids"][r]):
      if s == 0:
        continue
      cols = np.flatnonzero(a["segment_ids"][r] == s)
      with torch.no_grad():  # each packed document alone, from position 0
        z = torch_model(torch.tensor(a["tokens"][r, cols][None])).logits[0].double().numpy()
      z = z - z.max(-1, keepdims=True)  # the cache stores logits shifted by the row max
      order = np.argsort(-z, axis=-1, kind="stable")[:, :meta["k"]]
      ref_v = np.take_along_axis(z, order, -1)
      got_i, got_v = a["topk_idx"][r, cols], a["topk_logit"][r, cols].astype(np.float64)
      # Ids exact unless the reference itself has a near-tie at that rank.
      gaps = np.abs(np.diff(np.sort(z, -1)[:, ::-1][:, :meta["k"] + 1], axis=-1))
      gaps = np.concatenate([np.full_like(gaps[:, :1], np.inf), gaps], axis=1)
      tie = np.minimum(gaps[:, :-1], gaps[:, 1:]) < 1e-5
      assert ((got_i == order) | tie).all()
      np.testing.assert_allclose(got_v, ref_v, rtol=2 ** -8, atol=1e-6)  # bf16 rounding
      assert (got_v[:, 0] == 0).all()
      for j, t in enumerate(meta["temperatures"]):
        ref_lse = np.log(np.exp(z / t - (z / t).max(-1, keepdims=True)).sum(-1)) + (
            z / t).max(-1)
        np.testing.assert_allclose(a["lse"][r, cols, j], ref_lse, rtol=1e-5)
      checked += len(cols)
  assert checked > 100


def test_reader_batches_and_to_dense(tmp_path, teacher_dir):
  path, _ = teacher_dir
  job = job_from_config(job_config(tmp_path, path))
  reader = cache.CacheReader(build_cache(job, "train", progress=False))
  n = reader.rows
  b1, b2 = Loader(reader, 8, seed=5).batch(3), Loader(reader, 8, seed=5).batch(3)
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])
  # Per-process slices tile the global batch; an epoch covers every row once.
  halves = [Loader(reader, 8, 5, p, 2).batch(3)["tokens"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), b1["tokens"])
  order = Order(n, reader.meta["rows_per_chunk"], 8, seed=0)
  steps = n // 5
  seen = np.concatenate([order.global_indices(s * 5, 5) for s in range(steps)])
  assert len(set(seen.tolist())) == len(seen) == steps * 5
  assert not np.array_equal(order.global_indices(0, n), order.global_indices(n, n))
  dense = cache.to_dense(b1["topk_idx"][0], b1["topk_logit"][0], b1["lse"][0, :, 0], 64, 1.0)
  np.testing.assert_allclose(dense.sum(-1), 1.0, atol=1e-6)
  reader.validate(vocab_size=64, seq_len=16, temperature=2.0)
  with pytest.raises(UserError, match="temperature=3.0 is not cached"):
    reader.validate(vocab_size=64, seq_len=16, temperature=3.0)
  with pytest.raises(UserError, match="vocab_size=64, the student has 65"):
    reader.validate(vocab_size=65, seq_len=16)


def test_memory_kvstore(tmp_path, teacher_dir):
  path, _ = teacher_dir
  job = job_from_config(job_config(tmp_path, path, **{"cache.path": "memory://tcache"}))
  out = build_cache(job, "eval", progress=False)
  assert out == "memory://tcache/eval"
  assert cache.CacheReader(out).rows > 0


def test_kill_and_resume_identical(tmp_path, teacher_dir):
  path, _ = teacher_dir
  (tmp_path / "ref").mkdir()
  over = {"cache.chunks_per_step": 2, "cache.rows_per_chunk": 2}
  ref_job = job_from_config(job_config(tmp_path / "ref", path, train_docs=600, **over))
  _, ref = read_all(build_cache(ref_job, "train", progress=False))
  cfg = write_config_file(tmp_path, job_config(tmp_path, path, train_docs=600, **over))
  rng = np.random.default_rng(0)
  killed, progress = 0, []
  train = str(tmp_path / "run" / "cache" / "train")
  total = len(ref["done"])

  def n_done():
    meta = cache.read_metadata(train)
    return 0 if meta is None else int(cache.open_arrays(train, meta)["done"].read().result().sum())

  for attempt in range(5):  # kill at seeded random points of progress
    target = n_done() + int(rng.integers(20, total // 6))
    p = subprocess.Popen([sys.executable, "-m", "moedistill.cache_logits", f"--config={cfg}",
                          "--split=train"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while p.poll() is None and n_done() < target:
      time.sleep(0.02)
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
      killed += 1
    p.wait()
    progress.append(n_done())
  print("done chunks after each kill:", progress, "of", total)
  done = run_cli("moedistill.cache_logits", f"--config={cfg}", "--split=train")
  assert done.returncode == 0, done.stderr
  assert killed >= 4 and 0 < progress[0] < progress[-1] < total, progress
  meta, got = read_all(str(tmp_path / "run" / "cache" / "train"))
  assert meta["complete"]
  for n in NAMES[:-1]:
    np.testing.assert_array_equal(got[n], ref[n], err_msg=n)


def run_two_processes(module, cfg, *args, timeout=300):
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, f"--config={cfg}", f"--coordinator=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *args],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def test_two_processes_make_the_same_cache(tmp_path, teacher_dir):
  path, _ = teacher_dir
  over = {"cache.chunks_per_step": 1, "cache.rows_per_chunk": 4}
  (tmp_path / "one").mkdir()
  one = job_from_config(job_config(tmp_path / "one", path, **over))
  _, ref = read_all(build_cache(one, "train", progress=False))
  cfg = write_config_file(tmp_path, job_config(tmp_path, path, **over))
  run_two_processes("moedistill.cache_logits", cfg, "--split=train")
  meta, got = read_all(str(tmp_path / "run" / "cache" / "train"))
  assert meta["complete"]
  for n in NAMES:
    np.testing.assert_array_equal(got[n], ref[n], err_msg=n)


def test_corrupted_chunk_and_metadata_are_detected(tmp_path, teacher_dir):
  path, _ = teacher_dir
  job = job_from_config(job_config(tmp_path, path, **{"cache.codec": "none"}))
  out = build_cache(job, "train", progress=False)
  chunk = sorted((tmp_path / "run" / "cache" / "train" / "topk_logit").rglob("c/*/0/0"))[2]
  raw = bytearray(chunk.read_bytes())
  raw[10] ^= 0xFF  # one flipped byte, no codec to trip over: only the checksum can tell
  chunk.write_bytes(bytes(raw))
  reader = cache.CacheReader(out)
  bad_chunk = int(chunk.parent.parent.name)  # c/<chunk>/0/0
  with pytest.raises(UserError, match=f"rows.*{bad_chunk * 4}, {bad_chunk * 4 + 3}"):
    reader.read_rows(np.arange(bad_chunk * 4, bad_chunk * 4 + 4))
  reader.read_rows(np.arange(0, 4))  # other chunks still read
  (tmp_path / "run" / "cache" / "train" / "metadata.json").write_text('{"format": "moedi')
  with pytest.raises(UserError, match="metadata.json is corrupted"):
    cache.CacheReader(out)
