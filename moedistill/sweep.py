"""The recommended experiments from one cache: a grid of alpha, temperature, top-k and stage
plans, one student per point, and a comparison report.

CLI: python -m moedistill.sweep --config=configs/two_stage.py --sweep.alpha=0.5,0.9
       --sweep.temperature=1,2 --sweep.k=16,32 [--sweep.stage_order=wrappers,all:all]
       [--sweep.points='[{"alpha": 0.5, "k": 16}, ...]'] [--sweep.check_only]
Every point trains from the same cache (`<workdir>/cache`) and the same zero-shot student
(`<workdir>/student_init`) into `<workdir>/sweep/<point>`, exactly as `train` would with the
same overrides (it IS the train code path); a point with a `result.json` is done and skipped,
a killed point resumes from its checkpoints. Results: `<workdir>/sweep/report.json` and
`sweep.png`. A smaller k' than the cache's is emulated exactly (first k' entries, the rest
folded into the tail bucket); a temperature must be cached for the bucket mode.
"""
from __future__ import annotations

import copy
import itertools
import json
import sys
from pathlib import Path

import jax

from moedistill.errors import UserError

AXES = ("alpha", "temperature", "k", "stage_order")


def parse_grid(values: dict[str, list[str] | None], points: str | None) -> list[dict]:
  """Points of the grid (cartesian product of the given axes) or of an explicit list."""
  if points:
    import ast
    try:
      pts = ast.literal_eval(points)
    except (ValueError, SyntaxError) as e:
      raise UserError(f"--sweep.points={points!r}: not a list of dicts ({e})") from None
    if not isinstance(pts, list) or not all(isinstance(p, dict) for p in pts):
      raise UserError(f"--sweep.points={points!r}: expected a list of dicts")
    for p in pts:
      bad = set(p) - set(AXES)
      if bad:
        raise UserError(f"--sweep.points: unknown axis {sorted(bad)}; expected {list(AXES)}")
    grid = [{a: _typed(a, p[a]) for a in AXES if a in p} for p in pts]
  else:
    given = {a: [_typed(a, v) for v in vs] for a, vs in values.items() if vs}
    grid = [dict(zip(given, combo)) for combo in itertools.product(*given.values())]
  if not grid or grid == [{}]:
    raise UserError("the sweep grid is empty: give --sweep.alpha, --sweep.temperature, "
                    "--sweep.k, --sweep.stage_order or --sweep.points")
  return grid


def _typed(axis: str, v):
  try:
    return {"alpha": float, "temperature": float, "k": int, "stage_order": str}[axis](v)
  except ValueError:
    raise UserError(f"--sweep.{axis}={v!r}: expected a "
                    f"{'number' if axis != 'stage_order' else 'stage list'}") from None


def point_name(p: dict) -> str:
  short = {"alpha": "a", "temperature": "T", "k": "k", "stage_order": "s"}
  return "_".join(f"{short[a]}{str(p[a]).replace(',', '+')}" for a in AXES if a in p) or "base"


def point_config(base, p: dict):
  """The config of one point: the base config with the point's values, the sweep's workdir,
  and the base's cache and zero-shot student."""
  c = copy.deepcopy(base)
  root = Path(base.workdir)
  c.workdir = str(root / "sweep" / point_name(p))
  c.cache.path = base.cache.path or str(root / "cache")
  c.student.init_from = base.student.init_from or str(root / "student_init")
  if "stage_order" in p:
    c.stage_order = p["stage_order"]
  for field in ("alpha", "temperature"):
    if field in p:
      c.train[field] = p[field]
      for name in c.stages.keys():  # a stage's own override would otherwise win
        c.stages[name][field] = p[field]
  if "k" in p:
    c.train.k = p["k"]
  return c


def check_points(base, grid):
  """Every point's config must be valid before any training starts."""
  from moedistill import train
  from moedistill.config import job_from_config
  from moedistill.errors import ConfigError
  jobs = []
  for p in grid:
    try:
      job = job_from_config(point_config(base, p))
      train.preflight(job)
    except ConfigError as e:
      raise UserError(f"sweep point {point_name(p)}: {e}") from None
    jobs.append(job)
  return jobs


def finish_point(job, p: dict, export, teacher_eval: dict) -> dict:
  """Evaluate a point's export on the held-out cache and write its result.json (last)."""
  from moedistill.data.cache import CacheReader
  from moedistill.report import evaluate_path
  reader = CacheReader(job.cache_path("eval"))
  from moedistill import atomic_io
  res = {"point": point_name(p), **p, **evaluate_path(job, export, reader)}
  res["kl_gap_to_teacher"] = res["kl"] - teacher_eval["kl"]
  res["settings"] = point_settings(job)
  if jax.process_index() == 0:  # written last: its presence means done
    atomic_io.write_json(Path(job.workdir, "result.json"), res)
  return res


def point_settings(job) -> dict:
  """Every setting of a point's job but its workdir, flat ("train.batch_size": 4), as JSON
  holds it: what result.json records and a rerun compares before reusing it."""
  import dataclasses
  out = {}

  def plain(v):  # a set's order varies between runs (string hashing): sorted
    if isinstance(v, (set, frozenset)):
      return sorted(map(str, v))
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

  def walk(prefix, v):
    if isinstance(v, dict):
      for k, x in v.items():
        walk(f"{prefix}.{k}" if prefix else str(k), x)
    else:
      out[prefix] = plain(v)
  walk("", {k: v for k, v in dataclasses.asdict(job).items() if k != "workdir"})
  return json.loads(json.dumps(out, default=str))


def reuse_result(job, p: dict) -> dict | None:
  """A point's result.json when it was made with the point's settings; None when there is
  none; a result made with other settings is refused naming the first differing field."""
  f = Path(job.workdir, "result.json")
  if not f.exists():
    return None
  res = json.loads(f.read_text())
  old, new = res.get("settings"), point_settings(job)
  if old is None:
    raise UserError(f"sweep point {point_name(p)}: {f} records no settings (made by an older "
                    f"version); delete {job.workdir} to train the point again")
  for k in list(new) + [k for k in old if k not in new]:
    if old.get(k) != new.get(k):
      raise UserError(f"sweep point {point_name(p)}: {f} was made with {k}={old.get(k)!r}, "
                      f"the config has {new.get(k)!r}; delete {job.workdir} to train the point "
                      "again, or use another workdir")
  return res


def run_point(job, p: dict, teacher_eval: dict) -> dict:
  """Train (or resume) one point on the plain `train` code path, then evaluate it."""
  from moedistill import train
  return finish_point(job, p, train.train(job), teacher_eval)


def run_group(jobs, grid, members, todo, mesh, teacher_eval) -> dict[int, dict]:
  """Train grid points `members` as one batched program (sweep_batched), then export and
  evaluate those in `todo` exactly as run_point does; {index: result}."""
  from moedistill import train
  from moedistill.training import sweep_batched as B
  names = [point_name(grid[i]) for i in members]
  group_dir = Path(jobs[0].workdir).parent / B.group_name(names)
  trainer, stacked = B.train_group([jobs[i] for i in members], names, group_dir, mesh)
  out = {}
  for j, i in enumerate(members):
    if i not in todo:
      continue
    Path(jobs[i].workdir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      B.split_metrics(group_dir, names[j], Path(jobs[i].workdir))
    export = train.save_export(jobs[i], trainer.point_model(stacked, j))
    out[i] = finish_point(jobs[i], grid[i], export, teacher_eval)
  return out


def batched_allowed(mode: str, job0, mesh) -> bool:
  """Whether groups may be batched at all; `on` where they cannot is refused."""
  why = ("a mesh of more than one device" if mesh.size > 1 or jax.process_count() > 1 else
         "config.train.restart_from" if job0.train.restart_from else
         # the batched step vmaps students only; an online teacher runs per point (train)
         "config.train.teacher_mode=online" if job0.train.teacher_mode == "online" else None)
  if mode == "on" and why:
    raise UserError(f"--sweep.batched=on: not available with {why}; use "
                    "--sweep.batched=off")
  return mode != "off" and why is None


# --sweep.batched=auto batches on one CPU device up to this many tokens per point and step:
# the largest step measured (64 x 128 tokens), where batching was faster in most runs
# (README "Sweeps"); beyond it, not measured, points run one at a time.
AUTO_MAX_TOKENS = 8192


def auto_batches(job) -> bool:
  """The measured rule for --sweep.batched=auto (README "Sweeps")."""
  tokens = job.train.batch_size * job.train_data.seq_len
  return jax.default_backend() == "cpu" and tokens <= AUTO_MAX_TOKENS


def plan_groups(jobs, grid, done: set[int], mode: str, allowed: bool) -> list[tuple]:
  """[(members, todo)]: points that share a program (same settings but alpha) train as one
  group when batching applies; a group interrupted before all its points were written is
  found again by its members.json and finished, not retrained."""
  from moedistill.training.sweep_batched import group_key
  by_key: dict[str, list[int]] = {}
  for i, job in enumerate(jobs):
    by_key.setdefault(group_key(job), []).append(i)
  out = []
  for idx in by_key.values():
    todo = [i for i in idx if i not in done]
    if not todo:
      continue
    members = _earlier_group(jobs, grid, idx, todo) or todo
    batch = allowed and len(members) >= 2 and (mode == "on" or auto_batches(jobs[idx[0]]))
    out += [(members, set(todo))] if batch else [([i], {i}) for i in todo]
  return sorted(out, key=lambda g: min(g[0]))  # grid order


def _earlier_group(jobs, grid, idx, todo) -> list[int] | None:
  root = Path(jobs[idx[0]].workdir).parent
  index = {point_name(grid[i]): i for i in idx}
  for f in sorted(root.glob("_group_*/members.json")):
    names = json.loads(f.read_text())
    if set(names) <= set(index) and {point_name(grid[i]) for i in todo} <= set(names):
      return [index[n] for n in names]
  return None


def run_sweep(base, grid, batched: str = "off") -> dict:
  from moedistill import train
  from moedistill.config import job_from_config
  from moedistill.data.cache import CacheReader
  from moedistill.report import evaluate_path
  from moedistill.training.sweep_report import write_sweep_report
  jobs = check_points(base, grid)
  job0 = job_from_config(base)
  mesh = train.preflight(job0)
  allowed = batched_allowed(batched, job0, mesh)
  train.ensure_caches(job0, mesh)
  train.ensure_student(job0, mesh)
  reader = CacheReader(job0.cache_path("eval"))
  refs = {"teacher": evaluate_path(job0, job0.teacher, reader),
          "zero_shot": evaluate_path(job0, job0.student_init, reader)}
  results = {i: r for i, r in ((i, reuse_result(job, grid[i])) for i, job in enumerate(jobs))
             if r is not None}
  for i in sorted(results):
    print(f"[{i + 1}/{len(grid)}] {point_name(grid[i])}: done, reused", flush=True)
  for members, todo in plan_groups(jobs, grid, set(results), batched, allowed):
    names = ", ".join(point_name(grid[i]) for i in members)
    if len(members) == 1:
      print(f"[{members[0] + 1}/{len(grid)}] {names}: training", flush=True)
      results[members[0]] = run_point(jobs[members[0]], grid[members[0]], refs["teacher"])
    else:
      print(f"[batched {len(members)}] {names}: training together", flush=True)
      results.update(run_group(jobs, grid, members, todo, mesh, refs["teacher"]))
  return write_sweep_report(Path(base.workdir) / "sweep", refs,  # settings: in result.json
                            [{k: v for k, v in results[i].items() if k != "settings"}
                             for i in range(len(grid))])


def main(argv):
  from moedistill.cli import FLAGS, load_job
  from moedistill.training.trainer import Preempted
  load_job(argv)  # validates the base config, starts multi-host
  values = {a: FLAGS[f"sweep.{a}"].value for a in AXES}
  if values["stage_order"]:  # stage orders contain commas: ':' separates them
    values["stage_order"] = FLAGS["sweep.stage_order"].value.split(":")
  grid = parse_grid(values, FLAGS["sweep.points"].value)
  if FLAGS["sweep.check_only"].value:  # validate every point, train nothing
    check_points(FLAGS.config, grid)
    print("\n".join(point_name(p) for p in grid))
    return
  try:
    report = run_sweep(FLAGS.config, grid, FLAGS["sweep.batched"].value)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  if jax.process_index() == 0:
    print(f"report: {Path(FLAGS.config.workdir) / 'sweep' / 'report.json'}; best point "
          f"{report['best']['point']}")


def define_sweep_flags():
  from absl import flags
  for a in ("alpha", "temperature", "k"):
    flags.DEFINE_list(f"sweep.{a}", None, f"values of {a} to sweep (comma-separated)")
  flags.DEFINE_string("sweep.stage_order", None,
                      "stage orders to sweep, separated by ':' (e.g. wrappers,all:all)")
  flags.DEFINE_enum("sweep.batched", "auto", ["auto", "on", "off"],
                    "train points that differ only in alpha together in one vmapped program: "
                    "on, off (one at a time, each bit-identical to a plain train run), or "
                    "auto (where measured faster; README \"Sweeps\")")
  flags.DEFINE_bool("sweep.check_only", False,
                    "check the config and every point, print the point names, train nothing")
  flags.DEFINE_string("sweep.points", None,
                      "an explicit list of points instead of a grid, e.g. "
                      "'[{\"alpha\": 0.5, \"k\": 16}]'")


if __name__ == "__main__":
  from moedistill.cli import run
  run(main, extra_flags=(define_sweep_flags,))
