"""The one boundary where an ml_collections ConfigDict becomes frozen dataclasses.

Everything past `job_from_config` sees typed, validated values; every check names the
config field (`config.cache.k=...`) and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path


from moedistill.config_checks import (_check, _choice, _lanes, _number, _positive,
                                      runtime)
from moedistill.data.sources import DataSpec
from moedistill.model.layers import Runtime
from moedistill.sharding import MeshConfig

KD_MODES = ("bucket", "renormalize", "teacher_only", "sampled")
# kd modes a sampled cache supports (its targets are unbiased weights, not top-k
# probabilities: bucket and renormalize would treat them as the latter; training/loss.py)
SAMPLED_KD_MODES = ("sampled", "teacher_only")
TEACHER_MODES = ("cache", "online")  # KD targets: cached top-k, or the teacher in the step
SCHEDULES = ("cosine", "linear", "constant")
STAGE_KINDS = ("offline", "on_policy")  # on_policy: the student samples, the teacher grades


def join(base: str, *parts: str) -> str:
  """Join a local path, a kvstore URL (gs://..., memory://...) or a kvstore JSON spec."""
  if base.lstrip().startswith("{"):
    from moedistill.data import cache
    return cache.join(base, *parts)
  if "://" in base:
    return "/".join([base.rstrip("/"), *parts])
  return str(Path(base, *parts))


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  path: str
  k: int
  temperatures: tuple[float, ...]
  rows_per_chunk: int
  chunks_per_step: int
  vocab_chunk: int
  codec: str
  shuffle_chunks: int = 8  # training reads: chunks whose rows are shuffled together
  prefetch: int = 4        # training reads: batches read ahead
  read_lanes: int = 0      # training reads: lanes of chunks (0: the process count, kept)
  format: str = "plain"    # top-k layout: plain (int32 ids, bf16 logits) | packed (topk_codec)
  mode: str = "topk"       # topk | sampled (N draws per position, unbiased; topk_codec)
  samples: int = 0         # sampled: draws per position
  exact_k: int = 0         # sampled: exact top ids kept besides the draws


@dataclasses.dataclass(frozen=True)
class Group:
  pattern: str
  lr_mult: float
  weight_decay: float | None  # None: the default rule (no decay on norms, biases, embeddings)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  steps: int
  epochs: float
  groups: tuple[Group, ...]
  lr: float
  alpha: float
  temperature: float
  warmup_steps: int
  # kind=on_policy (training/on_policy.py): a step is on-policy with probability lmbda (a pure
  # function of (seed, global step)); it samples max_new_tokens from the student at
  # sample_temperature after a cache row cut at a random point, and minimises the generalised
  # JSD(beta) to the online teacher on those tokens. Offline steps use the fields above.
  kind: str = "offline"
  lmbda: float = 1.0
  beta: float = 1.0
  max_new_tokens: int = 0
  sample_temperature: float = 1.0
  # The fields whose value came from config.train (the stage left them unset): a refusal
  # names the field the user set, config.train.<f> for these, config.stages.<name>.<f> else.
  inherited: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

  def field(self, f: str) -> str:
    return f"config.train.{f}" if f in self.inherited else f"config.stages.{self.name}.{f}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int
  micro_batches: int
  kd_mode: str
  vocab_chunk: int
  schedule: str
  min_lr_ratio: float
  weight_decay: float
  clip_norm: float
  b1: float
  b2: float
  checkpoint_every: int
  keep: int
  log_every: int
  stages: tuple[Stage, ...]
  k: int = 0  # teacher top-k the loss uses (0 = the cache's k; fewer emulates a top-k' cache)
  restart_from: str = ""  # a checkpoint step directory whose params start a fresh run
  teacher_mode: str = "cache"  # cache: cached top-k (kd_mode); online: the teacher runs in
                               # the step, the KD term is the exact full-vocab KL


@dataclasses.dataclass(frozen=True)
class Job:
  workdir: str
  seed: int
  teacher: str
  train_data: DataSpec
  eval_data: DataSpec
  cache: CacheConfig
  model: Runtime  # how to compute, passed whole to hf.load_model
  mesh: MeshConfig
  student_init: str
  ranks: tuple[int, int, int]
  train: TrainConfig
  gen_prompts: int = 0  # report: held-out prompts of greedy exact match (training/gen_eval.py;
                        # only with the demo's teacher; 0 = off, the default without config.report)
  report_after_train: bool = True  # config.report.after_train: `train` ends with the report

  def cache_path(self, split: str) -> str:
    return join(self.cache.path, split)


def _data(c, split_cfg, tokenizer, field) -> DataSpec:
  src = split_cfg.source
  src = (src,) if isinstance(src, str) else tuple(src)
  _check(len(src) > 0, f"config.data.{field}.source is empty: expected files or a hub name")
  _check(all(isinstance(x, str) and x for x in src), f"config.data.{field}.source="
         f"{list(src)!r}: expected file paths/globs or one hub dataset name")
  return DataSpec(source=src, name=f"config.data.{field}.source", tokenizer=tokenizer,
                  seq_len=c.data.seq_len,
                  text_field=c.data.text_field, hub_config=split_cfg.hub_config or None,
                  split=split_cfg.split, max_rows=split_cfg.max_rows,
                  revision=split_cfg.get("revision") or None,
                  block_bytes=c.data.get("block_bytes", 64 * 2**20))


def _cache(c) -> CacheConfig:
  cc = c.cache
  _check(len(cc.temperatures) > 0, "config.cache.temperatures is empty: expected positive "
         "numbers, e.g. 1,2")
  _check(all(_number(t) and t > 0 for t in cc.temperatures),
         f"config.cache.temperatures={list(cc.temperatures)!r}: expected positive numbers")
  temps = tuple(float(t) for t in cc.temperatures)
  _check(cc.k >= 1, f"config.cache.k={cc.k}: expected >= 1")
  _check(cc.rows_per_chunk >= 1, f"config.cache.rows_per_chunk={cc.rows_per_chunk}: expected >= 1")
  _check(cc.codec in ("zstd", "none"), f"config.cache.codec={cc.codec!r}: expected zstd or none")
  return CacheConfig(path=cc.path or join(c.workdir, "cache"), k=cc.k, temperatures=temps,
                     rows_per_chunk=cc.rows_per_chunk, chunks_per_step=cc.chunks_per_step,
                     vocab_chunk=cc.vocab_chunk, codec=cc.codec,
                     shuffle_chunks=_positive(cc.get("shuffle_chunks", 8), "cache.shuffle_chunks"),
                     prefetch=_positive(cc.get("prefetch", 4), "cache.prefetch"),
                     read_lanes=_lanes(cc.get("read_lanes", 0)), **_cache_kind(cc))


def _cache_kind(cc) -> dict:
  """cache.format / mode / samples / exact_k, checked against each other."""
  fmt = _choice(cc.get("format", "plain"), ("plain", "packed"), "cache.format")
  mode = _choice(cc.get("mode", "topk"), ("topk", "sampled"), "cache.mode")
  samples, exact_k = cc.get("samples", 0), cc.get("exact_k", 0)
  _check(fmt == "plain" or cc.codec == "zstd", "config.cache.format=packed: needs "
         "config.cache.codec=zstd (each chunk's id stream is padded to its worst case; zstd "
         "removes the padding)")
  _check(fmt == "plain" or cc.k <= 256, f"config.cache.k={cc.k}: cache.format=packed holds "
         "at most 256 entries per position (the argmax position is a uint8)")
  if mode == "topk":
    _check(not samples and not exact_k, f"config.cache.samples={samples}, exact_k={exact_k}: "
           "only for config.cache.mode=sampled")
    return {"format": fmt}
  _check(fmt == "plain", "config.cache.format=packed: applies to cache.mode=topk (a sampled "
         "cache has its own layout)")
  _check(isinstance(samples, int) and not isinstance(samples, bool) and 1 <= samples <= 255,
         f"config.cache.samples={samples!r}: expected 1..255 draws per position with "
         "cache.mode=sampled")
  _check(isinstance(exact_k, int) and not isinstance(exact_k, bool) and 0 <= exact_k <= cc.k,
         f"config.cache.exact_k={exact_k!r}: expected 0..config.cache.k={cc.k}")
  _check(len(cc.temperatures) == 1, f"config.cache.temperatures={list(cc.temperatures)!r}: a "
         "sampled cache draws at one temperature; give exactly one")
  return {"format": fmt, "mode": mode, "samples": samples, "exact_k": exact_k}


def _group(name, g) -> Group:
  ok = (isinstance(g, (list, tuple)) and 2 <= len(g) <= 3 and isinstance(g[0], str)
        and _number(g[1]) and (len(g) < 3 or g[2] is None or _number(g[2])))
  _check(ok, f"config.stages.{name}.groups: {g!r}, expected (regex, lr_multiplier"
         "[, weight_decay]) with numbers for the multiplier and the decay")
  return Group(g[0], float(g[1]), None if len(g) < 3 or g[2] is None else float(g[2]))


def _stage(name, s, t) -> Stage:
  _check(len(s.groups) > 0, f"config.stages.{name}.groups is empty: expected (regex, "
         "lr_multiplier[, weight_decay]) entries, e.g. [('.*', 1.0)]")
  groups = [_group(name, g) for g in s.groups]
  inherited = frozenset(f for f in ("lr", "alpha", "temperature", "warmup_steps")
                        if s.get(f) is None)
  alpha = t.alpha if s.get("alpha") is None else s.alpha
  temp = t.temperature if s.get("temperature") is None else s.temperature
  where = lambda f: f"config.train.{f}" if f in inherited else f"config.stages.{name}.{f}"  # noqa: E731
  _check(0.0 <= alpha <= 1.0, f"{where('alpha')}={alpha}: expected a value in [0, 1]")
  _check(temp > 0, f"{where('temperature')}={temp}: expected > 0")
  _check((s.steps > 0) != (s.get("epochs", 0) > 0),
         f"config.stages.{name}: steps={s.steps}, epochs={s.get('epochs', 0)}; set exactly one")
  return Stage(name=name, steps=int(s.steps), epochs=float(s.get("epochs", 0) or 0),
               groups=tuple(groups), lr=float(t.lr if s.get("lr") is None else s.lr),
               alpha=float(alpha), temperature=float(temp),
               warmup_steps=int(t.warmup_steps if s.get("warmup_steps") is None
                                else s.warmup_steps), inherited=inherited,
               **_on_policy_fields(name, s))


def _on_policy_fields(name, s) -> dict:
  """kind, lmbda, beta, max_new_tokens, sample_temperature of one stage (the on-policy ones
  only checked, and only allowed away from their defaults, when kind=on_policy)."""
  f = lambda x: f"config.stages.{name}.{x}"  # noqa: E731
  kind = _choice(s.get("kind", "offline"), STAGE_KINDS, f"stages.{name}.kind")
  lmbda, beta = s.get("lmbda", 1.0), s.get("beta", 1.0)
  new, temp = s.get("max_new_tokens", 0), s.get("sample_temperature", 1.0)
  if kind == "offline":
    _check(new in (0, None), f"{f('max_new_tokens')}={new!r}: only for "
           f"{f('kind')}=on_policy")
    return {}
  _check(_number(lmbda) and 0.0 <= lmbda <= 1.0, f"{f('lmbda')}={lmbda!r}: expected a "
         "value in [0, 1] (the fraction of on-policy steps)")
  _check(_number(beta) and 0.0 <= beta <= 1.0, f"{f('beta')}={beta!r}: expected a value in "
         "[0, 1] (0 forward KL, 1 reverse KL)")
  _check(isinstance(new, int) and not isinstance(new, bool) and new >= 1,
         f"{f('max_new_tokens')}={new!r}: expected a positive integer with "
         f"{f('kind')}=on_policy")
  _check(_number(temp) and temp > 0, f"{f('sample_temperature')}={temp!r}: expected > 0")
  return {"kind": kind, "lmbda": float(lmbda), "beta": float(beta), "max_new_tokens": new,
          "sample_temperature": float(temp)}


def _on_policy_against_job(c, stages):
  """An on-policy stage needs a teacher to grade and room in a row for a prompt."""
  for st in stages:
    if st.kind != "on_policy":
      continue
    _check(isinstance(c.teacher, str) and c.teacher.strip() != "",
           f"config.teacher={c.teacher!r}: config.stages.{st.name}.kind=on_policy needs the "
           "teacher's directory (it scores the student's samples online)")
    _check(st.max_new_tokens < c.data.seq_len, f"config.stages.{st.name}.max_new_tokens="
           f"{st.max_new_tokens}: expected < config.data.seq_len={c.data.seq_len} (prompt "
           "and sample share one row)")


def _kd_against_cache(c, kd_mode, stages, k):
  """A kd mode needs a cache of its kind: refused by name otherwise."""
  sampled = c.cache.get("mode", "topk") == "sampled"
  if not sampled:
    _check(kd_mode != "sampled", "config.train.kd_mode=sampled: needs a sampled cache "
           "(config.cache.mode=sampled, cache.samples=N)")
    return
  _check(kd_mode in SAMPLED_KD_MODES, f"config.train.kd_mode={kd_mode!r}: a sampled cache "
         f"(config.cache.mode=sampled) holds unbiased draws, not top-k log-probs; expected one "
         f"of {list(SAMPLED_KD_MODES)} (bucket and renormalize need cache.mode=topk)")
  _check(k == 0, f"config.train.k={k}: a sampled cache has no top-k to truncate; expected 0")
  t_cache = float(c.cache.temperatures[0])
  for st in stages:
    _check(abs(st.temperature - t_cache) < 1e-9, f"{st.field('temperature')}="
           f"{st.temperature}: a sampled cache's draws are from the teacher at its "
           f"temperature {t_cache} (config.cache.temperatures), and only there unbiased")


def _train(c) -> TrainConfig:
  t = c.train
  _check(t.kd_mode in KD_MODES, f"config.train.kd_mode={t.kd_mode!r}: expected one of {KD_MODES}")
  _check(t.schedule in SCHEDULES, f"config.train.schedule={t.schedule!r}: expected one of "
         f"{SCHEDULES}")
  _check(t.batch_size >= 1 and t.micro_batches >= 1 and t.batch_size % t.micro_batches == 0,
         f"config.train.batch_size={t.batch_size}: expected a positive multiple of "
         f"micro_batches={t.micro_batches}")
  order = [n.strip() for n in c.stage_order.split(",") if n.strip()]
  _check(len(order) > 0, "config.stage_order is empty: expected stage names, e.g. 'wrappers,all'")
  for n in order:
    _check(n in c.stages, f"config.stage_order names stage {n!r}, which is not in config.stages "
           f"({sorted(c.stages.keys())})")
  _check(len(set(order)) == len(order), f"config.stage_order={c.stage_order!r} repeats a stage")
  stages = tuple(_stage(name, c.stages[name], t) for name in order)
  k = int(t.get("k", 0) or 0)
  _check(0 <= k <= c.cache.k, f"config.train.k={k}: expected 0 (all) or at most "
         f"config.cache.k={c.cache.k} (a top-k cache emulates any smaller k exactly)")
  _kd_against_cache(c, t.kd_mode, stages, k)
  _on_policy_against_job(c, stages)
  return TrainConfig(batch_size=t.batch_size, micro_batches=t.micro_batches, kd_mode=t.kd_mode,
                     vocab_chunk=t.vocab_chunk, schedule=t.schedule, min_lr_ratio=t.min_lr_ratio,
                     weight_decay=t.weight_decay, clip_norm=t.clip_norm, b1=t.b1, b2=t.b2,
                     checkpoint_every=t.checkpoint_every, keep=t.keep, log_every=t.log_every,
                     stages=stages, k=k, restart_from=t.get("restart_from") or "",
                     teacher_mode=_choice(t.get("teacher_mode", "cache"), TEACHER_MODES,
                                          "train.teacher_mode"))


def job_from_config(c) -> Job:
  teacher = os.path.expanduser(c.teacher)
  tokenizer = c.data.tokenizer or teacher
  st = c.student
  ranks = tuple(int(st.get(f"rank_{p}") or st.rank) for p in ("gate", "up", "down"))
  return Job(
      workdir=c.workdir, seed=c.seed, teacher=teacher,
      train_data=_data(c, c.data.train, tokenizer, "train"),
      eval_data=_data(c, c.data.eval, tokenizer, "eval"), cache=_cache(c),
      model=runtime(c.model),
      mesh=MeshConfig(**{a: c.mesh[a] for a in ("data", "fsdp", "expert", "tensor")}),
      student_init=st.init_from or str(Path(c.workdir, "student_init")), ranks=ranks,
      train=_train(c), gen_prompts=_gen_prompts(c), report_after_train=_after_train(c))


def _after_train(c) -> bool:
  v = c.get("report", {}).get("after_train", True)
  _check(isinstance(v, bool), f"config.report.after_train={v!r}: expected True or False")
  return v


def _gen_prompts(c) -> int:
  n = c.get("report", {}).get("gen_prompts", 0)
  _check(isinstance(n, int) and not isinstance(n, bool) and n >= 0,
         f"config.report.gen_prompts={n!r}: expected 0 (off) or a positive integer")
  return n
