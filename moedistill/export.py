"""Export a student checkpoint as Hugging Face safetensors.

CLI: python -m moedistill.export --config=configs/two_stage.py [--checkpoint=DIR] [--out=DIR]
         [--format=merged|native] [--dtype=bfloat16] [--max_shard_bytes=N] [--overwrite]
  --checkpoint defaults to config.student.init_from, --out to <workdir>/export; without
  --config both are required.
  merged: W_e = shared_core + A_e B_e materialised into a standard Qwen3-MoE checkpoint that
          transformers.AutoModelForCausalLM loads;
  native: the compact shared-core form, which moedistill.hub.hf.load_model opens.
  --dtype: the output dtype, a float type; default the teacher's (config.teacher's
  config.json), else the checkpoint's own.
Streams: the checkpoint is loaded sharded over the config's mesh (one device without
--config) and written param by param, each layer's experts merged once, into shards plus
model.safetensors.index.json; multi-host, every process runs the same command, process 0 writes.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from moedistill import sharding
from moedistill.cli import load_job, pick, run
from moedistill.errors import ConfigError
from moedistill.hub import hf
from moedistill.model.layers import Runtime

FORMATS = ("merged", "native")


def parse_dtype(name: str):
  """A float dtype from its name ('bfloat16', 'float32', ...), or one line naming it."""
  try:
    d = jnp.dtype(name)
  except TypeError:
    d = None
  if d is None or not jnp.issubdtype(d, jnp.floating):
    raise ConfigError(f"--dtype={name!r}: expected a float type (bfloat16, float16, float32)")
  return d


def export(checkpoint, out, *, fmt: str = "merged", overwrite: bool = False, dtype=None,
           max_shard_bytes: int = 5 * 2**30, tokenizer_from=None, mesh=None):
  """Writes `checkpoint` (a native or HF directory) to `out`; returns `out`. `dtype` defaults
  to the checkpoint's own; `mesh` (default: one device) is where it is loaded, sharded."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {FORMATS}")
  dtype = parse_dtype(str(dtype)) if dtype is not None else None
  out = Path(out)
  if out.exists() and not overwrite:
    raise ConfigError(f"--out={out} already exists; pass --overwrite to replace it")
  stored = hf.checkpoint_dtype(checkpoint)
  put = sharding.sharded_put(mesh) if mesh is not None else None
  model, _ = hf.load_model(checkpoint, Runtime(param_dtype=stored), put=put)
  return hf.save_model(model, out, merged=fmt == "merged", max_shard_bytes=max_shard_bytes,
                       dtype=dtype or stored, tokenizer_from=tokenizer_from or checkpoint)


def define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "native or HF checkpoint directory "
                      "(default: config.student.init_from)")
  flags.DEFINE_string("out", None, "output directory (default: <workdir>/export)")
  flags.DEFINE_string("format", "merged", "merged (default) or native")
  flags.DEFINE_string("dtype", None, "output float dtype (default: the teacher's, else the "
                      "checkpoint's)")
  flags.DEFINE_integer("max_shard_bytes", 5 * 2**30, "largest safetensors shard")


def main(argv):
  job, F = load_job(argv, required=False)
  checkpoint = pick(F.checkpoint, "checkpoint", job and job.student_init)
  out = pick(F.out, "out", job and str(Path(job.workdir) / "export"))
  dtype = F.dtype
  if dtype is None and job is not None:
    dtype = hf.checkpoint_dtype(job.teacher)
  mesh = sharding.make_mesh(job.mesh) if job is not None else None
  out = export(checkpoint, out, fmt=F.format, overwrite=F.overwrite, dtype=dtype,
               max_shard_bytes=F.max_shard_bytes, mesh=mesh)
  print(f"wrote {out} ({F.format})")


if __name__ == "__main__":
  run(main, extra_flags=("overwrite", define_flags))
