"""Export a student checkpoint as Hugging Face safetensors.

CLI: python -m moedistill.export --checkpoint=DIR --out=DIR --format=merged|native [--overwrite]
  merged: W_e = shared_core + A_e B_e materialised into a standard Qwen3-MoE checkpoint that
          transformers.AutoModelForCausalLM loads (written shard by shard, one layer's
          experts on the host at a time);
  native: the compact shared-core form, which moedistill.hf.load_model opens.
"""
from __future__ import annotations

from pathlib import Path

from moedistill import hf
from moedistill.cli import load_job, pick, run
from moedistill.errors import ConfigError

FORMATS = ("merged", "native")


def export(checkpoint, out, *, fmt: str = "merged", overwrite: bool = False,
           max_shard_bytes: int = 5 * 2**30, tokenizer_from=None):
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {FORMATS}")
  out = Path(out)
  if out.exists() and not overwrite:
    raise ConfigError(f"--out={out} already exists; pass --overwrite to replace it")
  model, _ = hf.load_model(checkpoint)
  return hf.save_model(model, out, merged=fmt == "merged", max_shard_bytes=max_shard_bytes,
                       tokenizer_from=tokenizer_from or checkpoint)


def define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "native or HF checkpoint directory "
                      "(default: config.student.init_from)")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_string("format", "merged", "merged (default) or native")
  flags.DEFINE_integer("max_shard_bytes", 5 * 2**30, "largest safetensors shard")


def main(argv):
  job, F = load_job(argv, required=False)
  checkpoint = pick(F.checkpoint, "checkpoint", job and job.student_init)
  if F.out is None:
    raise ConfigError("--out is required: the directory to write")
  out = export(checkpoint, F.out, fmt=F.format, overwrite=F.overwrite,
               max_shard_bytes=F.max_shard_bytes)
  print(f"wrote {out} ({F.format})")


if __name__ == "__main__":
  run(main, extra_flags=("overwrite", define_flags))
