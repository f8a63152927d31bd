"""Benchmark: distillation quality per cache byte (issue 23 item 5). The same zero-shot student
(moedistill.compress of the real-vocabulary teacher at --rank) distilled with equal steps, batch
and learning rates from each kind of teacher target:

  top16          top-16 cache, today's format (int32 ids, bf16 logits)
  top64          top-64 cache, today's format
  top64_packed   top-64 cache, cache.format=packed (Rice-coded ids, 1-byte log-prob codes)
  sampled12      cache.mode=sampled cache.samples=12 (unbiased draws; kd_mode=sampled)
  sampled32      cache.mode=sampled cache.samples=32
  sampled12_exact4  cache.samples=12 cache.exact_k=4 (the teacher's top 4 exact, 12 draws from
                 the rest: the head's share of the gradient without sampling noise)
  online         train.teacher_mode=online (the teacher in the train step, exact full-vocab KL)

  nice -n 19 python -m benchmarks.quality_per_byte [--teacher_dir=runs/real_vocab_teacher]
      [--root=runs/qpb]
      [--variants=top64,top16,top64_packed,sampled12,sampled32,sampled12_exact4,online]
      [--steps=100] [--batch=8] [--train_rows=800] [--rank=8] [--lr=1e-3] [--lr_all=3e-4]
      [--alpha=1] [--parallel=2] [--table_only] [--smoke]

The teacher, its train.jsonl and heldout.jsonl come from scripts/make_real_vocab_teacher.py
(--out). Every variant is one `python -m moedistill.train` in <root>/<variant> with
configs/quality_per_byte.py (configs/two_stage.py on that teacher) and the variant's overrides,
sharing <root>/student_init (made first by `python -m moedistill.compress`), --parallel at a
time (each variant's evaluation on the common cache waits for top64's to be complete).
Held-out figures, all on the same rows (heldout.jsonl packed the same way for every variant)
at T=1:
  KL full   exact full-vocab KL(teacher || student), from the train run's report.json
            (held_out.evaluate_model with the teacher loaded beside the student: what
            `python -m moedistill.evaluate --full_vocab` computes); independent of the cache.
  ppl       perplexity of the held-out tokens; independent of the cache.
  KL bucket, top-1   against ONE cache, top64's plain eval cache, for every row: bucket KL
            at k=64 and top-1 agreement with the teacher. The report gives them for top64 and
            online (whose eval caches are that cache); for the others `python -m
            moedistill.evaluate --cache=<top64>/cache/eval` measures them.

Columns: cache bytes/token (the train cache on disk, everything included: token arrays,
teacher entries, metadata; bytes per cached entry = that / k), build tokens/s (the teacher
forward over the train split, after its first step), train tokens/s (both stages, after each
stage's first, compiling step, from metrics.jsonl), and the held-out figures.
--smoke: two variants (top64, sampled12) of two steps of stage `all` on the embedded tiny
teacher and its corpus, 16 held-out rows, in a temporary directory (a test of the script, not
a measurement).
Results: <root>/results.json; plot of full-vocab KL against bytes/token: --plot.
A variant whose workdir already holds a report.json is not trained again (delete it to rerun).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common

ROOT = common.REPO
CONFIG = "configs/quality_per_byte.py"

F = flags.FLAGS
flags.DEFINE_string("teacher_dir", "runs/real_vocab_teacher",
                    "--out of scripts/make_real_vocab_teacher.py")
flags.DEFINE_string("root", "runs/qpb", "one workdir per variant under it")
flags.DEFINE_list("variants", "top64,top16,top64_packed,sampled12,sampled32,sampled12_exact4,"
                  "online",
                  "variants in run order (top64 first: its eval cache is the common one)")
flags.DEFINE_integer("steps", 100, "optimizer steps per stage (wrappers, then all)")
flags.DEFINE_integer("batch", 8, "rows per optimizer step")
flags.DEFINE_integer("train_rows", 800, "train rows cached (data.train.max_rows)")
flags.DEFINE_integer("rank", 8, "student wrapper rank")
flags.DEFINE_float("lr", 1e-3, "peak LR of the wrappers stage (train.lr)")
flags.DEFINE_float("lr_all", 3e-4, "peak LR of the all-parameters stage (stages.all.lr)")
flags.DEFINE_float("alpha", 1.0, "KD weight of the loss (1 = pure distillation: the CE term "
                   "would pull every student toward the data, where the teacher is wrong)")
flags.DEFINE_integer("eval_batch", 8, "rows per forward in the common evaluation")
flags.DEFINE_bool("table_only", False, "run nothing: the table from results already there")
flags.DEFINE_string("plot", "docs/quality_per_byte.png", "plot path ('' = none)")
flags.DEFINE_integer("parallel", 2, "variants run at once (after the shared zero-shot student)")
flags.DEFINE_integer("wait_common", 3600, "seconds a variant waits for top64's eval cache")
flags.DEFINE_bool("smoke", False, "top64 and sampled12, two steps of stage all, 16 held-out "
                  "rows, on the embedded tiny teacher in a temporary directory (a test of the "
                  "script)")
flags.DEFINE_integer("eval_rows", 0, "held-out rows evaluated (data.eval.max_rows; 0 = all)")
flags.DEFINE_string("out", "", "also write the JSON record here")

VARIANTS = {
    "top16": dict(k=16, overrides=["--config.cache.k=16"]),
    "top64": dict(k=64, overrides=["--config.cache.k=64"]),
    "top64_packed": dict(k=64, overrides=["--config.cache.k=64", "--config.cache.format=packed"]),
    "sampled12": dict(k=None, overrides=["--config.cache.mode=sampled", "--config.cache.samples=12",
                                         "--config.train.kd_mode=sampled"]),
    "sampled32": dict(k=None, overrides=["--config.cache.mode=sampled", "--config.cache.samples=32",
                                         "--config.train.kd_mode=sampled"]),
    "sampled12_exact4": dict(k=None, overrides=[
        "--config.cache.mode=sampled", "--config.cache.samples=12", "--config.cache.exact_k=4",
        "--config.train.kd_mode=sampled"]),
    "online": dict(k=64, overrides=["--config.cache.k=64", "--config.train.teacher_mode=online"]),
}
def env():
  return {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": os.environ.get(
      "JAX_PLATFORMS", "cpu"), "PYTHONUNBUFFERED": "1"}


def common_flags(workdir: Path) -> list[str]:
  return [f"--config={CONFIG}:{Path(F.teacher_dir).resolve()}",
          f"--config.workdir={workdir}",
          f"--config.student.init_from={Path(F.root).resolve() / 'student_init'}",
          f"--config.student.rank={F.rank}", f"--config.train.batch_size={F.batch}",
          f"--config.data.train.max_rows={F.train_rows}",
          f"--config.stages.wrappers.steps={F.steps}", f"--config.stages.all.steps={F.steps}",
          f"--config.train.lr={F.lr}", f"--config.stages.all.lr={F.lr_all}",
          f"--config.train.alpha={F.alpha}",
          "--config.report.gen_prompts=0",  # greedy decoding: not a figure of this benchmark
          *(["--config.stage_order=all"] if F.smoke else []),  # one train program to compile
          *([f"--config.data.eval.max_rows={F.eval_rows}"] if F.eval_rows else [])]


def run(cmd: list[str], log: Path) -> tuple[int, float, str]:
  print("$ " + " ".join(cmd), flush=True)
  t0 = time.time()
  with open(log, "a") as f:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    p = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    f.write(p.stdout)
  return p.returncode, time.time() - t0, p.stdout


def last_json(text: str) -> dict:
  i = text.rfind("\n{")
  return json.loads(text[i + 1:] if i >= 0 else text[text.index("{"):])


def train_rate(workdir: Path) -> float | None:
  """Tokens/s over both stages, each stage from its first logged line to its last (the
  compiling first step excluded): a logged line's tokens_per_s is tokens since the stage
  start over seconds since it."""
  p = workdir / "metrics.jsonl"
  if not p.exists():
    return None
  per = F.batch * 128
  stages: dict[str, list] = {}
  for line in p.read_text().splitlines():
    try:
      m = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "tokens_per_s" in m:
      stages.setdefault(m["stage"], []).append((m["step"], m["tokens_per_s"]))
  tokens = seconds = 0.0
  for pts in stages.values():
    (s1, r1), (s2, r2) = pts[0], pts[-1]
    if s2 > s1:
      tokens += per * (s2 - s1)
      seconds += per * s2 / r2 - per * s1 / r1
  return tokens / seconds if seconds > 0 else None


def cache_stats(workdir: Path) -> dict:
  p = workdir / "cache" / "train" / "metadata.json"
  if not p.exists():
    return {}
  meta = json.loads(p.read_text())
  st = meta.get("stats", {})
  return {"bytes_per_token": st.get("bytes_per_token_disk"),
          "bytes_per_token_raw": meta.get("bytes_per_token_raw"),
          "build_tokens_per_s": st.get("tokens_per_s_after_first_step"),
          "vocab_size": meta.get("vocab_size"), "rows": meta.get("rows")}


def evaluate(name: str, checkpoint: Path, common_cache: Path, log: Path) -> dict:
  """Bucket KL at k=64, perplexity, top-1 agreement on the common cache (no teacher load)."""
  out = Path(F.root) / f"eval_{name}.json"
  if out.exists():
    return json.loads(out.read_text())
  cmd = [sys.executable, "-m", "moedistill.evaluate",
         *common_flags(Path(F.root).resolve() / "top64"), f"--checkpoint={checkpoint}",
         f"--cache={common_cache}", f"--batch_size={F.eval_batch}"]
  rc, _, text = run(cmd, log)
  if rc:
    return {"error": text.strip().splitlines()[-1] if text.strip() else f"exit {rc}"}
  res = last_json(text)
  out.write_text(json.dumps(res, indent=2))
  return res


def complete(cache_dir: Path) -> bool:
  p = cache_dir / "metadata.json"
  return p.exists() and json.loads(p.read_text()).get("complete", False)


def run_variant(name: str) -> dict:
  v = VARIANTS[name]
  root = Path(F.root).resolve()
  wd = root / name
  log = root / f"{name}.log"
  res = {"overrides": v["overrides"]}
  if not (wd / "report.json").exists():
    if F.table_only:
      return {"skipped": "not run (--table_only)"}
    cmd = [sys.executable, "-m", "moedistill.train", *common_flags(wd), *v["overrides"]]
    rc, wall, text = run(cmd, log)
    res["train_wall_s"] = round(wall)
    if rc:
      tail = [x for x in text.strip().splitlines() if x.strip()][-1:] or [f"exit {rc}"]
      return {**res, "skipped": f"train failed (exit {rc}): {tail[0][:300]}"}
  res.update(cache_stats(wd), k=v["k"])  # k: entries per position (None: sampled)
  res["train_tokens_per_s"] = train_rate(wd)
  report = json.loads((wd / "report.json").read_text())
  res["report"] = report
  d = report["student_distilled"]
  res["eval"] = {"kl_full": d.get("kl_full"), "ppl": d["ppl"], "kl": d["kl"],
                 "top1_agreement": d["top1_agreement"], "kl_kind": d.get("kl_kind")}
  if name not in ("top64", "online"):  # their eval caches are top64's
    common = root / "top64" / "cache" / "eval"
    for _ in range(F.wait_common // 10):  # top64 may run beside this variant
      if complete(common):
        break
      time.sleep(10)
    if not complete(common):
      return {**res, "skipped": "no common eval cache (top64 did not run)"}
    e = evaluate(name, wd / "export", common, log)
    if "error" in e:
      return {**res, "skipped": f"evaluate failed: {e['error'][:300]}"}
    res["eval"].update(kl=e["kl"], top1_agreement=e["top1_agreement"], kl_kind=e.get("kl_kind"),
                       ppl_common=e["ppl"])
  return res


def table(results: dict, refs: dict) -> str:
  head = (f"{'variant':<16} {'B/token':>8} {'B/entry':>8} {'build tok/s':>12} "
          f"{'train tok/s':>12} {'KL full':>8} {'KL bucket':>10} {'ppl':>8} {'top-1':>7}")
  lines = [head, "-" * len(head)]

  def fmt(x, spec):
    width = int(re.match(r"\d+", spec).group())
    return format(x, spec) if isinstance(x, (int, float)) else format("-", f">{width}")

  for name, r in list(refs.items()) + list(results.items()):
    if "skipped" in r:
      lines.append(f"{name:<16} skipped: {r['skipped']}")
      continue
    e = r.get("eval", r)
    if "error" in e:
      lines.append(f"{name:<16} evaluate failed: {e['error'][:200]}")
      continue
    online = name == "online"  # its KD reads no cache (the train cache gives the tokens)
    bpt = None if online else r.get("bytes_per_token")
    k = r.get("k")
    lines.append(
        f"{name:<16} {fmt(bpt, '8.1f')} {fmt(bpt / k if bpt and k else None, '8.2f')} "
        f"{fmt(None if online else r.get('build_tokens_per_s'), '12,.0f')} "
        f"{fmt(r.get('train_tokens_per_s'), '12,.0f')} "
        f"{fmt(e.get('kl_full'), '8.4f')} {fmt(e.get('kl'), '10.4f')} {fmt(e.get('ppl'), '8.2f')} "
        f"{fmt(e.get('top1_agreement'), '7.4f')}")
  return "\n".join(lines)


def plot(results: dict, refs: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  n_points = 0
  for name, r in sorted(results.items(), key=lambda x: x[0] == "online"):  # online last
    e = r.get("eval", {})
    if "skipped" in r or e.get("kl_full") is None:
      continue
    if name == "online":
      ax.axhline(e["kl_full"], ls="--", c="gray", lw=1)
      ax.text(0.01, e["kl_full"], "online teacher (no cache)", va="bottom", fontsize=8,
              color="gray", transform=ax.get_yaxis_transform())  # x in axes units
      continue
    x = r.get("bytes_per_token")
    if x:
      ax.scatter([x], [e["kl_full"]])
      ax.annotate(name, (x, e["kl_full"]), textcoords="offset points", fontsize=8,
                  xytext=(4, 4) if n_points % 2 == 0 else (4, -11))  # neighbours apart
      n_points += 1
  z = refs.get("zero-shot", {}).get("eval", {})
  if "kl_full" in z:
    ax.set_title(f"zero-shot student: KL {z['kl_full']:.3f}", fontsize=9)
  ax.set_xscale("log")
  ax.set_xlabel("train cache bytes per token on disk (log)")
  ax.set_ylabel("held-out full-vocab KL(teacher || student), nats/token")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  print(f"plot: {path}")


def smoke_inputs(tmp: Path) -> Path:
  """The embedded tiny teacher and its corpus laid out as make_real_vocab_teacher writes."""
  assets = ROOT / "moedistill" / "assets"
  src = tmp / "teacher_dir"
  src.mkdir()
  (src / "teacher").symlink_to(assets / "tiny_teacher")
  for split in ("train", "heldout"):
    (src / f"{split}.jsonl").symlink_to(assets / "corpus" / f"{split}.jsonl")
  return src


def main(argv):
  if not F.smoke:
    return measure()
  with tempfile.TemporaryDirectory() as tmp:
    F.teacher_dir = str(smoke_inputs(Path(tmp)))
    F.root, F.plot = str(Path(tmp) / "qpb"), ""
    F.variants, F.steps, F.batch, F.train_rows, F.parallel = ["top64", "sampled12"], 2, 4, 16, 1
    F.eval_rows = 16
    measure()


def measure():
  root = Path(F.root).resolve()
  root.mkdir(parents=True, exist_ok=True)
  tdir = Path(F.teacher_dir).resolve()
  if not (tdir / "teacher" / "config.json").exists():
    sys.exit(f"{tdir}/teacher: no teacher; run scripts/make_real_vocab_teacher.py first")
  results_path = root / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  for name in F.variants:
    if name not in VARIANTS:
      sys.exit(f"--variants: unknown {name!r}; expected some of {list(VARIANTS)}")

  import threading
  lock = threading.Lock()

  def one(name):
    print(f"== {name}", flush=True)
    r = run_variant(name)
    with lock:
      results[name] = r
      print(f"== {name}: " + json.dumps({k: v for k, v in r.items() if k != "report"})[:800],
            flush=True)
      results_path.write_text(json.dumps(results, indent=2))

  init = root / "student_init"
  if not (init / "config.json").exists() and not F.table_only:  # shared by every variant
    rc, _, text = run([sys.executable, "-m", "moedistill.compress",
                       *common_flags(root / "top64")], root / "compress.log")
    if rc:
      sys.exit(f"compress failed: {text.strip().splitlines()[-1:]}")
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(max(1, F.parallel)) as pool:
    list(pool.map(one, F.variants))
  refs = {}
  top = root / "top64" / "report.json"
  if top.exists():
    rep = json.loads(top.read_text())
    refs = {"teacher": {"eval": rep["teacher"]}, "zero-shot": {"eval": rep["student_init"]}}
  ordered = {n: results[n] for n in VARIANTS if n in results}
  results_path.write_text(json.dumps({**ordered, "_refs": refs}, indent=2))
  print(f"\nheld-out ({Path(F.teacher_dir).name}/heldout.jsonl, top64's eval cache, T=1); "
        f"{F.steps}+{F.steps} steps x {F.batch} rows x 128 tokens, rank {F.rank}")
  print(table(ordered, refs))
  if F.plot:
    plot(ordered, refs, F.plot)
  failed = [n for n, r in ordered.items() if "skipped" in r and F.smoke]
  if failed:
    sys.exit(f"smoke: {failed} did not run: {ordered[failed[0]]['skipped']}")
  summary = {n: {"bytes_per_token": r.get("bytes_per_token"), **r.get("eval", {}),
                 "train_tokens_per_s": r.get("train_tokens_per_s"),
                 "build_tokens_per_s": r.get("build_tokens_per_s")}
             for n, r in ordered.items() if "skipped" not in r}
  common.emit("quality_per_byte", {"steps": F.steps, "batch": F.batch, "rank": F.rank,
                                   "alpha": F.alpha, "variants": summary}, F.out)


if __name__ == "__main__":
  app.run(main)
