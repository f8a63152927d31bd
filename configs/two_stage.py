"""Two-stage distillation of a shared-core student: wrappers only, then everything.

Launch (embedded tiny teacher, CPU, a few minutes):
  python -m moedistill.train --config=configs/two_stage.py
A real model (teacher and data paths as overrides):
  python -m moedistill.train --config=configs/two_stage.py:qwen3_30b_a3b \
      --config.teacher=/models/Qwen3-30B-A3B \
      --config.data.train.source=/data/train.jsonl --config.data.eval.source=/data/eval.jsonl
On-policy distillation after the two offline stages (docs/on_policy.md):
  python -m moedistill.train --config=configs/two_stage.py:on_policy
Any field below can be overridden as --config.<path>=<value>.
"""
from pathlib import Path

import ml_collections
from ml_collections import config_dict

ASSETS = Path(__file__).resolve().parent.parent / "moedistill" / "assets"


def _split(source, split="train"):
  return ml_collections.ConfigDict(dict(
      source=source,          # local files/globs (json, jsonl, parquet, txt) or a hub name
      hub_config="",          # hub dataset config name ('' = none)
      revision="",            # hub dataset revision: a branch, tag or commit ('' = main)
      split=split,            # hub dataset split
      max_rows=0,             # keep only the first N packed rows (0 = all)
  ))


def _stage(steps, groups, **overrides):
  s = ml_collections.ConfigDict(dict(
      steps=steps,            # optimizer steps in this stage (or set epochs instead)
      epochs=0.0,             # passes over the cached train rows (0 = use steps)
      groups=groups,          # ordered (regex, lr multiplier[, weight decay]); first match wins
      lr=config_dict.placeholder(float),           # peak LR override (default train.lr)
      alpha=config_dict.placeholder(float),        # KD weight override (default train.alpha)
      temperature=config_dict.placeholder(float),  # KD temperature override
      warmup_steps=config_dict.placeholder(int),   # warmup override
      kind="offline",         # offline (cached/online teacher on corpus rows) | on_policy
                              # (the student samples, the teacher grades; docs/on_policy.md)
      lmbda=1.0,              # on_policy: fraction of steps that are on-policy (rest offline)
      beta=1.0,               # on_policy: generalised JSD, 0 forward KL .. 1 reverse KL
      max_new_tokens=0,       # on_policy: tokens sampled after each prompt (< data.seq_len)
      sample_temperature=1.0,  # on_policy: the student's sampling temperature
  ))
  s.update(overrides)
  return s


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.workdir = "runs/two_stage"         # cache, student_init, checkpoints, export, report go here
  c.seed = 0                           # data order and any random init
  c.teacher = str(ASSETS / "tiny_teacher")  # Hugging Face directory of the teacher

  c.data = ml_collections.ConfigDict()
  c.data.tokenizer = ""                # tokenizer directory ('' = the teacher's)
  c.data.seq_len = 128                 # packed row length (documents joined with EOS)
  c.data.text_field = "text"           # column holding the text
  c.data.block_bytes = 64 * 2**20      # jsonl/txt piece: unit of tokenizing, host split, resume
  c.data.train = _split([str(ASSETS / "corpus" / "train.jsonl")])
  c.data.eval = _split([str(ASSETS / "corpus" / "heldout.jsonl")])

  c.cache = ml_collections.ConfigDict()
  c.cache.path = ""                    # directory, kvstore URL or kvstore JSON spec ('' = <workdir>/cache)
  c.cache.k = 32                       # teacher top-k kept per token
  c.cache.temperatures = [1.0, 2.0]    # full-vocab logsumexp stored for each
  c.cache.rows_per_chunk = 8           # rows per TensorStore chunk (unit of resume)
  c.cache.chunks_per_step = 2          # chunks per process per teacher forward
  c.cache.shuffle_chunks = 8           # training reads: chunks whose rows are shuffled together
  c.cache.prefetch = 4                 # training reads: batches read ahead (async)
  c.cache.read_lanes = 0               # training reads: lanes of chunks, each process reads its
                                       # own (0 = the process count; kept in checkpoints)
  c.cache.vocab_chunk = 8192           # vocab columns per step of the top-k/logsumexp scan
  c.cache.codec = "zstd"               # zstd | none (a crc32c checksum is always stored)
  c.cache.format = "plain"             # plain (int32 ids, bf16 logits) | packed (~half the
                                       # bytes, <= 8.7e-4 nats added KL; docs/cache_format.md)
  c.cache.mode = "topk"                # topk | sampled (unbiased draws; train.kd_mode=sampled)
  c.cache.samples = 0                  # sampled: draws per position (e.g. 12)
  c.cache.exact_k = 0                  # sampled: exact top ids kept besides the draws

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "auto"               # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
  c.model.param_dtype = "float32"      # parameter dtype
  c.model.moe_backend = "auto"         # auto (exact, per device and shapes: docs/gpu.md) |
                                       # sorted | ragged | capacity | mgpu | pallas | ragged_vjp
  c.model.capacity_factor = 1.25       # capacity backend only
  c.model.ep_capacity_factor = 0.0     # mesh.expert > 1 with a dropless backend: all-to-all
                                       # buffers in even shares; 0 = worst case (never drops),
                                       # >= 1 bounds them, overflow dropped and counted
  c.model.remat = "none"               # per decoder layer: none (save all) | full (save only
                                       # its input, recompute it) | dots (save projection
                                       # matmul outputs, recompute the rest)
  c.model.attention = "auto"           # auto (pallas on NVIDIA GPUs, else blocked for rows
                                       # longer than attention_block, else plain) | plain |
                                       # blocked | cudnn | pallas
  c.model.attention_block = 512        # query/key block of blocked attention (memory ~ block^2)
  c.model.scan_layers = False          # lax.scan over identical decoder layers instead of an
                                       # unrolled loop (same param paths; see benchmarks/compile.py)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))  # -1 = fill

  c.student = ml_collections.ConfigDict()
  c.student.init_from = ""             # student checkpoint ('' = <workdir>/student_init, made
                                       # by compressing the teacher if missing)
  c.student.rank = 4                   # wrapper rank for gate/up/down
  c.student.rank_gate = 0              # per-projection overrides (0 = use rank)
  c.student.rank_up = 0
  c.student.rank_down = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16              # global rows per optimizer step
  c.train.micro_batches = 1            # gradient accumulation steps per optimizer step
  c.train.alpha = 0.9                  # L = (1-alpha) CE + alpha T^2 KL
  c.train.temperature = 1.0            # must be one of cache.temperatures in bucket mode
  c.train.kd_mode = "bucket"           # bucket | renormalize | teacher_only
  c.train.teacher_mode = "cache"       # cache: KD from the cached top-k (kd_mode) | online:
                                       # the teacher runs inside the train step (both models
                                       # resident), KD = exact full-vocab KL at the stage's T
  c.train.k = 0                        # teacher top-k the loss uses (0 = cache.k; a smaller
                                       # k' emulates a top-k' cache exactly, see sweep)
  c.train.vocab_chunk = 4096           # vocab chunk of the fused loss (memory ~ tokens x chunk)
  c.train.lr = 3e-3                    # peak learning rate (x each group's multiplier)
  c.train.schedule = "cosine"          # cosine | linear | constant after warmup
  c.train.warmup_steps = 10
  c.train.min_lr_ratio = 0.1           # final LR / peak LR
  c.train.weight_decay = 0.0           # AdamW decay (never on norms, biases, embeddings)
  c.train.clip_norm = 1.0              # global-norm gradient clipping (0 = off)
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.checkpoint_every = 50        # steps between checkpoints (also at stage ends)
  c.train.keep = 3                     # checkpoints kept
  c.train.log_every = 10               # steps between metrics.jsonl lines
  c.train.restart_from = ""            # checkpoint step dir (.../checkpoints/<step>) whose params
                                       # start this run when its workdir has no checkpoints

  c.report = ml_collections.ConfigDict()
  c.report.after_train = True          # train ends by evaluating teacher, zero-shot and distilled
                                       # student (False: skip; python -m moedistill.report later)
  c.report.gen_prompts = 64            # held-out prompts of greedy exact match per model in the
                                       # report, the demo teacher's four tasks (0 = off)

  c.stage_order = "wrappers,all"      # stages to run, in order (ConfigDict keys sort by name)
  c.stages = ml_collections.ConfigDict()
  c.stages.wrappers = _stage(120, [(".*wrapper.*", 1.0), (".*", 0.0)])
  c.stages.all = _stage(120, [(".*embed.*", 0.0), (".*", 1.0)], lr=1e-3)

  if arg in ("qwen3_30b_a3b", "qwen3_30b_a3b_on_policy"):
    # Sized for one 8x80 GB node by `python -m moedistill.plan` (README "Measured").
    c.teacher = "Qwen3-30B-A3B"        # set to the local directory of the hub checkpoint
    c.data.seq_len = 4096
    c.cache.k = 64
    c.cache.rows_per_chunk = 16        # teacher forward: 16 rows x 4096 tokens, 2 rows per device
    c.cache.chunks_per_step = 1
    c.model.dtype = "bfloat16"
    c.model.remat = "full"             # save only each layer's input (bf16 [rows, 4096, 2048]);
                                       # `none` keeps every MoE intermediate of 48 layers
    c.model.scan_layers = True         # one scanned layer body: its buffers are reused by all
                                       # 48 layers (unrolled, plan measures ~2 GiB more per
                                       # layer) and the compile is ~48x smaller
    c.mesh.data = 1                    # no pure data parallelism: it would replicate the
    c.mesh.fsdp = 8                    # models; fsdp=8 splits params, Adam state and batch
    c.student.rank = 128
    c.train.batch_size = 64            # 64 x 4096 = 262k tokens per optimizer step
    c.train.micro_batches = 8          # 8 rows per micro-batch: 1 row (4k tokens) per device,
                                       # the most micro-batches 64 rows allow on 8 batch shards
    c.train.lr = 1e-4
    c.stages.wrappers.steps = 2000
    c.stages.all.steps = 8000
    c.stages.all.lr = 2e-5
    if arg == "qwen3_30b_a3b_on_policy":
      # then an on-policy stage: 512 new tokens after prompts cut inside the 4096-token rows,
      # reverse KL to the online teacher. 48 rows per step, not 64: the student's decode of a
      # step's rows is not micro-batched, its temporaries grow ~5.7 GiB per row per device
      # (plan: 84.7 GiB per device at 64 rows, 73.3 at 48; docs/on_policy.md "plan")
      c.train.batch_size = 48
      c.train.micro_batches = 6          # still 1 row per device per micro-batch
      c.stage_order = "wrappers,all,on_policy"
      c.stages.on_policy = _stage(1000, [(".*embed.*", 0.0), (".*", 1.0)], lr=1e-5,
                                  kind="on_policy", max_new_tokens=512)
  elif arg == "on_policy":
    # The demo's two offline stages, then 30 on-policy steps: the student continues cache
    # rows cut at random points and minimises the reverse KL to the online teacher on its own
    # tokens. Cache and zero-shot student are the plain demo's (built there if missing).
    c.workdir = "runs/two_stage_on_policy"
    c.cache.path = "runs/two_stage/cache"
    c.student.init_from = "runs/two_stage/student_init"
    c.stage_order = "wrappers,all,on_policy"
    c.stages.on_policy = _stage(30, [(".*embed.*", 0.0), (".*", 1.0)], lr=3e-4,
                                warmup_steps=3, kind="on_policy", max_new_tokens=32)
  elif arg:
    raise ValueError(f"configs/two_stage.py:{arg}: unknown variant, expected '', "
                     "'qwen3_30b_a3b', 'qwen3_30b_a3b_on_policy' or 'on_policy'")
  return c
