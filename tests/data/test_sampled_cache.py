"""Sampled teacher caches (cache.mode=sampled) and the packed top-k format (cache.format=packed).

The statistical test: on a vocab of 50, 4 positions, many independent N-draw caches from the
real device sampler, the mean of the sampled loss's gradient wrt the student logits equals the
full-vocab KD gradient (q - p) / T within 4 standard errors per coordinate, while a top-k
cache's gradient (renormalize mode, k=5) misses it by far more than that standard error.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moedistill.data import topk_codec as C
from moedistill.training import loss
from moedistill.training.vocab_sample import sample_ids
from moedistill.training.vocab_scan import topk_lse

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

V, POS, TRIALS = 50, 4, 2000


def _case(T):
  r = np.random.default_rng(0)
  t_logit = r.normal(0, 1.0, (POS, V))  # min p ~ 1e-3: every id drawn in 2000 x 8 draws
  s_logit = r.normal(0, 1.5, (POS, V))
  z = t_logit / T
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  zs = s_logit / T
  q = np.exp(zs - zs.max(1, keepdims=True))
  q /= q.sum(1, keepdims=True)
  return t_logit, s_logit, p, (q - p) / T  # full-vocab d KL(p || q) / d student logits


def _grads(s_logit, idx, logit, lse, T, mode):
  """Per-token gradient of the KD loss (alpha 1, without the T^2 factor) wrt student logits."""
  n, k = idx.shape
  s = jnp.asarray(np.tile(s_logit, (n // POS, 1)), jnp.float32)  # token = trial * POS + pos

  def f(s):
    stats = loss.dense_stats(s, jnp.asarray(idx), jnp.zeros(n, jnp.int32), T)
    kl, _, _ = loss.kl_terms(jnp.asarray(logit), jnp.asarray(lse), stats["s_topk"],
                             stats["lse_t"], T, mode)
    return jnp.sum(kl)

  return np.asarray(jax.grad(f)(s), np.float64).reshape(-1, POS, V)


def _draw(t_logit, T, N, exact_k, seed=1):
  """TRIALS independent caches of the 4 positions through the real sampler and decoder:
  the teacher 'forward' is h = logits, lm_head = identity."""
  h = jnp.asarray(np.tile(t_logit, (TRIALS, 1)), jnp.float32)  # token = trial * POS + pos
  w = jnp.eye(V, dtype=jnp.float32)
  top_v, top_i, lse = topk_lse(h, w, max(exact_k, 1), [T], chunk=16)
  u = np.random.default_rng(seed).random((TRIALS * POS, N))
  ex_i = top_i[:, :exact_k] if exact_k else None
  ex_v = top_v[:, :exact_k] if exact_k else None
  ids = np.asarray(sample_ids(h, w, jnp.asarray(u), lse[:, 0], T, 16, ex_i, ex_v))
  uniq, counts, _ = C.unique_counts(ids)
  shift = np.asarray(top_v[:, :1])  # the cache stores logits relative to the row max
  return C.sampled_targets(
      uniq, counts, T, None if ex_i is None else np.asarray(ex_i),
      None if ex_v is None else np.asarray(ex_v) - shift,
      np.asarray(lse[:, 0]) - shift[:, 0] / T)


@pytest.mark.parametrize("exact_k,T", [(0, 1.0), (3, 2.0)])
def test_sampled_gradient_is_unbiased_topk_is_not(exact_k, T):
  t_logit, s_logit, p, g_full = _case(T)
  idx, logit, lse = _draw(t_logit, T, N=8, exact_k=exact_k)
  g = _grads(s_logit, idx, logit, lse[:, 0], T, "sampled")
  mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(TRIALS)
  # The exact top ids' weights are p itself (no spread); every other id must vary across
  # draws, or the z-test below would say nothing about it.
  exact = se < 1e-7
  assert np.array_equal(exact.sum(1), np.full(POS, exact_k))
  assert np.abs(mean - g_full)[exact].max(initial=0) < 1e-5
  z = np.abs(mean - g_full)[~exact] / se[~exact]
  assert z.max() < 4.5, f"sampled gradient biased: max |z| = {z.max():.2f}"
  assert np.abs(mean - g_full).max() < 0.05 * np.abs(g_full).max()

  # The same case with a top-5 cache (renormalize): deterministic, so its gradient is its
  # own mean; it misses the full-vocab gradient by many of the sampled estimate's standard
  # errors (the test tells the two apart).
  k = 5
  order = np.argsort(-t_logit, axis=1)[:, :k]
  tl = np.take_along_axis(t_logit, order, axis=1)
  tl = tl - tl[:, :1]
  gk = _grads(s_logit, order, tl, np.zeros(POS), T, "renormalize")[0]
  zk = np.abs(gk - g_full)[~exact] / se[~exact]
  assert zk.max() > 30, f"top-k gradient unexpectedly close: max |z| = {zk.max():.2f}"


def test_sampler_frequencies_match_teacher():
  """The device sampler alone: id frequencies over all draws equal p within 4 sigma."""
  t_logit, _, p, _ = _case(1.0)
  h = jnp.asarray(np.tile(t_logit, (TRIALS, 1)), jnp.float32)
  _, _, lse = topk_lse(h, jnp.eye(V), 1, [1.0], chunk=16)
  u = np.random.default_rng(3).random((TRIALS * POS, 4))
  ids = np.asarray(sample_ids(h, jnp.eye(V), jnp.asarray(u), lse[:, 0], 1.0, 16))
  ids = ids.reshape(TRIALS, POS, 4).swapaxes(0, 1).reshape(POS, -1)
  n = ids.shape[1]
  freq = np.stack([np.bincount(ids[i], minlength=V) / n for i in range(POS)])
  sd = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(freq - p) < 4 * sd + 1e-12)


# ------------------------------------------------------------------ caches end to end

def _oracle(torch_model, tokens_l, segs_l):
  """float64 teacher logits [L, V] of a cached row, each packed document alone (NaN on
  padding), as tests/data/test_cache.py's oracle."""
  import torch
  out = None
  for s in np.unique(segs_l):
    if s == 0:
      continue
    cols = np.flatnonzero(segs_l == s)
    with torch.no_grad():
      z = torch_model(torch.tensor(tokens_l[cols][None])).logits[0].double().numpy()
    if out is None:
      out = np.full((len(segs_l), z.shape[-1]), np.nan)
    out[cols] = z
  return out


def _kl_rows(p, q):
  return np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0), -1)


def test_plain_and_packed_caches_build_and_read(tmp_path, teacher_dir):
  """A plain cache (today's format) still builds, reads, and keeps its metadata; a packed
  cache of the same teacher and rows decodes to the same top-k sets, its decoded
  distribution within STEP^2 / (8 T^2) nats of added full-vocab KL per token, its tail mass
  exact."""
  from conftest import job_config
  from moedistill.cache_logits import build_cache, finished
  from moedistill.config import job_from_config
  from moedistill.data import cache
  from moedistill.data.loader import Loader
  path, torch_model = teacher_dir
  (tmp_path / "plain").mkdir()
  (tmp_path / "packed").mkdir()
  job0 = job_from_config(job_config(tmp_path / "plain", path))
  job1 = job_from_config(job_config(tmp_path / "packed", path, **{"cache.format": "packed"}))
  p0, p1 = (build_cache(j, "train", progress=False) for j in (job0, job1))
  r0, r1 = cache.CacheReader(p0), cache.CacheReader(p1)
  assert (r0.kind, r1.kind) == ("plain", "packed")
  # The plain cache's metadata is what it was before formats existed (no new field), so an
  # old cache is still `finished` for an unchanged config.
  assert r0.meta["format"] == cache.FORMAT and not {"value_step", "samples", "exact_k",
                                                     "id_stream_bytes"} & set(r0.meta)
  assert finished(job0, "train")
  assert r1.meta["value_step"] == C.STEP and finished(job1, "train")
  b0, b1 = r0.meta["stats"]["bytes_per_token_disk"], r1.meta["stats"]["bytes_per_token_disk"]
  assert 0 < b1 < b0
  a0, a1 = r0.read_rows(np.arange(r0.rows)), r1.read_rows(np.arange(r1.rows))
  assert a1["topk_logit"].dtype == np.float32 and a0["topk_logit"].dtype != np.float32
  for n in ("tokens", "segment_ids"):
    np.testing.assert_array_equal(a0[n], a1[n])
  np.testing.assert_array_equal(np.sort(a0["topk_idx"], -1), np.sort(a1["topk_idx"], -1))
  np.testing.assert_array_equal(a0["topk_idx"][..., 0], a1["topk_idx"][..., 0])  # argmax
  assert np.all(np.diff(a1["topk_logit"], axis=-1) <= 0) and np.all(a1["topk_logit"][..., 0] == 0)
  # Training reads (Loader) give the decoded rows too.
  got = Loader(r1, 4, 0, window=2).batch(0)
  assert got["topk_logit"].dtype == np.float32 and got["topk_idx"].shape[1:] == (16, 8)

  V, temps = r1.meta["vocab_size"], r1.meta["temperatures"]
  added = []
  for row in range(0, r1.rows, 6):
    z = _oracle(torch_model, a1["tokens"][row], a1["segment_ids"][row])
    ok = ~np.isnan(z[:, 0])
    z = z[ok]
    top = np.argsort(-z, axis=-1, kind="stable")[:, :8]
    for j, T in enumerate(temps):
      lse = np.log(np.exp(z / T - (z / T).max(-1, keepdims=True)).sum(-1)) + (z / T).max(-1)
      p = np.exp(z / T - lse[:, None])
      dec = cache.to_dense(a1["topk_idx"][row][ok], a1["topk_logit"][row][ok],
                           a1["lse"][row][ok][:, j], V, T)
      shift = z.max(-1, keepdims=True)  # exact top-k with the same even tail
      ex = cache.to_dense(top, np.take_along_axis(z - shift, top, -1), lse - shift[:, 0] / T,
                          V, T)
      np.testing.assert_allclose(1 - dec[np.arange(len(z))[:, None], top].sum(-1),
                                 1 - np.take_along_axis(p, top, -1).sum(-1), atol=2e-6)
      extra = _kl_rows(p, dec) - _kl_rows(p, ex)
      assert extra.max() <= C.STEP ** 2 / (8 * T ** 2) + 1e-6, (T, extra.max())
      added.append(extra)
  added = np.concatenate(added)
  assert len(added) > 100 and added.mean() < 1e-3 and added.max() > 1e-6  # codes do round

  # The first packed format (codes stored as such, PACKED_FORMAT_V1) still reads: the same
  # cache rewritten that way decodes to the same rows.
  arrs = cache.open_arrays(p1, r1.meta, names=["topk_code"])
  stored = arrs["topk_code"].read().result().astype(np.int64)
  arrs["topk_code"].write((stored.max(-1, keepdims=True) - stored).astype(np.uint8)).result()
  meta_path = pathlib.Path(p1) / "metadata.json"
  assert meta_path.is_file()
  meta_path.write_text(json.dumps({**r1.meta, "format": cache.PACKED_FORMAT_V1}))
  r_old = cache.CacheReader(p1)
  assert r_old.kind == "packed"
  for n, x in r_old.read_rows(np.arange(r_old.rows)).items():
    np.testing.assert_array_equal(x, a1[n])


def test_sampled_cache_build_read_resume_refuse(tmp_path, teacher_dir):
  """A sampled cache (N=8 draws, 2 exact top ids): metadata, decoded weights (sum 1, the
  exact ids the teacher's top 2, the draws outside them), a repaired chunk bit-identical,
  reads through the Loader and evaluate; kd modes and temperatures it cannot serve refused by
  name."""
  from conftest import job_config
  from moedistill.cache_logits import build_cache
  from moedistill.config import job_from_config
  from moedistill.data import cache
  from moedistill.data.loader import Loader
  from moedistill.errors import UserError
  from moedistill.hub import hf
  from moedistill.model.layers import Runtime
  from moedistill.training.held_out import evaluate_model
  path, torch_model = teacher_dir
  over = {"cache.mode": "sampled", "cache.samples": 8, "cache.exact_k": 2,
          "cache.temperatures": [1.0], "train.kd_mode": "sampled"}
  job = job_from_config(job_config(tmp_path, path, **over))
  out = build_cache(job, "train", progress=False)
  r = cache.CacheReader(out)
  m = r.meta
  assert r.kind == "sampled" and (m["samples"], m["exact_k"], m["k"]) == (8, 2, 10)
  assert m["sample_seed"] == job.seed and m["stats"]["bytes_per_token_disk"] > 0
  a = r.read_rows(np.arange(r.rows))
  valid = a["segment_ids"] > 0
  w = np.exp(a["topk_logit"].astype(np.float64))  # T = 1, lse = 0
  np.testing.assert_allclose(w.sum(-1)[valid], 1.0, atol=1e-5)
  assert np.all(a["lse"] == 0)
  ids = a["topk_idx"]
  drawn = np.where(w[..., 2:] > 0, ids[..., 2:], -1)
  assert not np.any((drawn[..., :, None] == ids[..., None, :2]).any(-1))  # from the rest only
  for row in (0, 7):
    z = _oracle(torch_model, a["tokens"][row], a["segment_ids"][row])
    ok = ~np.isnan(z[:, 0])
    top2 = np.argsort(-z[ok], -1, kind="stable")[:, :2]
    np.testing.assert_array_equal(ids[row][ok][:, :2], top2)
    p = np.exp(z[ok] - z[ok].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(w[row][ok][:, :2], np.take_along_axis(p, top2, -1), rtol=1e-2)

  # Repair: a chunk marked not done and zeroed is recomputed bit-identically ((seed, chunk)).
  raw = {n: x.read().result() for n, x in r.arrays.items()}
  arrs = cache.open_arrays(out, m)
  R = m["rows_per_chunk"]
  arrs["done"][1].write(np.uint8(0)).result()
  arrs["sample_count"][R:2 * R].write(np.zeros_like(raw["sample_count"][R:2 * R])).result()
  arrs["packed_ids"][1].write(np.zeros_like(raw["packed_ids"][1])).result()
  meta = dict(m, complete=False)
  cache.write_metadata(out, meta)
  build_cache(job, "train", progress=False)
  again = {n: x.read().result() for n, x in cache.open_arrays(out, m).items()}
  for n in raw:
    np.testing.assert_array_equal(raw[n], again[n], err_msg=n)

  got = Loader(r, 4, 0, window=2).batch(0)
  assert got["topk_idx"].shape[1:] == (16, 10) and got["topk_logit"].dtype == np.float32
  model, _ = hf.load_model(path, Runtime())
  res = evaluate_model(model, r, temperature=1.0, batch_size=8, max_rows=16)
  assert res["kl_kind"] == "sampled" and np.isfinite(res["kl"]) and res["kl"] >= 0

  for mode in ("bucket", "renormalize"):
    with pytest.raises(UserError, match=f"cannot feed kd mode {mode}"):
      r.validate(vocab_size=64, seq_len=16, temperature=1.0, mode=mode)
  with pytest.raises(UserError, match="temperature=2.0"):
    r.validate(vocab_size=64, seq_len=16, temperature=2.0, mode="sampled")
  with pytest.raises(UserError, match="temperature=2.0"):
    evaluate_model(model, r, temperature=2.0)


def test_cache_kinds_refused_by_name(tmp_path):
  """Config combinations a reader or loss cannot use: one line naming the field."""
  from conftest import job_config
  from moedistill.config import job_from_config
  from moedistill.errors import ConfigError
  s = {"cache.mode": "sampled", "cache.samples": 8, "cache.temperatures": [1.0],
       "train.kd_mode": "sampled"}
  cases = [
      ({"cache.format": "zip"}, "config.cache.format='zip'"),
      ({"cache.mode": "dense"}, "config.cache.mode='dense'"),
      ({"cache.format": "packed", "cache.codec": "none"}, "config.cache.format=packed: needs"),
      ({"cache.samples": 8}, "config.cache.samples=8"),
      ({"train.kd_mode": "sampled"}, "config.train.kd_mode=sampled: needs a sampled cache"),
      ({**s, "train.kd_mode": "bucket"}, "config.train.kd_mode='bucket': a sampled cache"),
      ({**s, "train.kd_mode": "renormalize"}, "config.train.kd_mode='renormalize'"),
      ({**s, "cache.samples": 0}, "config.cache.samples=0"),
      ({**s, "cache.temperatures": [1.0, 2.0]}, "config.cache.temperatures=[1.0, 2.0]"),
      ({**s, "cache.format": "packed"}, "config.cache.format=packed: applies to"),
      ({**s, "train.k": 4}, "config.train.k=4"),
      ({**s, "train.temperature": 2.0}, "config.train.temperature=2.0"),
  ]
  for over, msg in cases:
    with pytest.raises(ConfigError) as e:
      job_from_config(job_config(tmp_path, tmp_path, **over))
    assert msg in str(e.value) and "\n" not in str(e.value), (over, str(e.value))
  job = job_from_config(job_config(tmp_path, tmp_path, **{**s, "train.kd_mode": "teacher_only"}))
  assert job.cache.mode == "sampled"


def test_topk_cache_refuses_sampled_mode(tmp_path):
  """A plain top-k cache read with kd mode sampled: refused by the reader, by name."""
  from moedistill.data import cache
  from moedistill.errors import UserError
  meta = {"format": cache.FORMAT, "rows": 4, "seq_len": 2, "k": 2, "temperatures": [1.0],
          "rows_per_chunk": 4, "codec": "zstd", "complete": True, "vocab_size": 8}
  path = str(tmp_path / "c")
  cache.open_arrays(path, meta, create=True)
  cache.write_metadata(path, meta)
  with pytest.raises(UserError, match="kd mode sampled needs a sampled cache"):
    cache.CacheReader(path).validate(vocab_size=8, seq_len=2, mode="sampled")


def test_bad_cache_format_cli_exit_2(tmp_path, teacher_dir):
  from conftest import job_config, run_cli, write_config_file
  cfg = write_config_file(tmp_path, job_config(tmp_path, teacher_dir[0],
                                               **{"cache.format": "zip"}))
  res = run_cli("moedistill.cache_logits", f"--config={cfg}")
  assert res.returncode == 2, res.stderr[-2000:]
  err = res.stderr.strip().splitlines()
  assert len(err) == 1 and "config.cache.format='zip'" in err[0], res.stderr[-2000:]


def test_train_and_report_on_a_sampled_cache(tmp_path):
  """train end to end (cache, compress, train, export, report) with a sampled cache of the
  demo teacher, N=12 draws: the student's held-out KL against the draws falls (differences of
  that KL between models are unbiased: training/held_out.py), and the report carries it."""
  from pathlib import Path

  import moedistill
  from conftest import job_config
  from moedistill.config import job_from_config
  from moedistill.data.cache import CacheReader
  from moedistill.report import evaluate_path
  from moedistill.train import train
  c = job_config(tmp_path, "unused")
  assets = Path(moedistill.__file__).parent / "assets"
  c.teacher = str(assets / "tiny_teacher")
  c.data.train.source = [str(assets / "corpus" / "train.jsonl")]
  c.data.eval.source = [str(assets / "corpus" / "heldout.jsonl")]
  c.data.seq_len, c.data.train.max_rows, c.data.eval.max_rows = 32, 64, 16
  c.cache.mode, c.cache.samples, c.cache.temperatures = "sampled", 12, [1.0]
  c.train.kd_mode, c.train.warmup_steps, c.train.batch_size = "sampled", 0, 8
  c.stage_order = "all"
  c.stages.all.steps, c.stages.all.lr = 8, 3e-3
  job = job_from_config(c)
  export = train(job, progress=False)
  held_out = CacheReader(job.cache_path("eval"))
  assert held_out.kind == "sampled"
  res = [evaluate_path(job, p, held_out) for p in (job.student_init, export)]
  assert all(r["kl_kind"] == "sampled" for r in res)
  assert res[1]["kl"] < 0.9 * res[0]["kl"], res


def test_plan_accepts_a_sampled_cache():
  """plan compiles the sampled cache's forward (with its uniforms) and the eval program on
  its batches (exact_k + samples float32 weights)."""
  from conftest import run_cli
  r = run_cli("moedistill.plan", "--devices=8", "--config=configs/two_stage.py",
              "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.data.seq_len=32",
              "--config.cache.mode=sampled", "--config.cache.samples=12",
              "--config.cache.exact_k=2", "--config.cache.temperatures=1",
              "--config.train.kd_mode=sampled", "--programs=cache_forward,eval,train")
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert {"cache_forward", "eval", "train_all"} <= set(out["programs"])


def test_sweep_checks_points_against_a_sampled_cache():
  """The sweep accepts a sampled cache for the axes that keep its draws unbiased (alpha) and
  refuses, naming the field, a point that would truncate it (k)."""
  from conftest import run_cli
  base = ("--config=configs/two_stage.py", "--config.cache.mode=sampled",
          "--config.cache.samples=12", "--config.cache.temperatures=1",
          "--config.train.kd_mode=sampled", "--sweep.check_only")
  ok = run_cli("moedistill.sweep", *base, "--sweep.alpha=0.5,1")
  assert ok.returncode == 0 and len(ok.stdout.strip().splitlines()) == 2, ok.stderr[-2000:]
  bad = run_cli("moedistill.sweep", *base, "--sweep.k=16")
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "config.train.k=16" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
