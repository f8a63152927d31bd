"""Export a student checkpoint as Hugging Face safetensors.

CLI: python -m moedistill.export --checkpoint=DIR --out=DIR --format=merged|native [--overwrite]
  merged: W_e = shared_core + A_e B_e materialised into a standard Qwen3-MoE checkpoint that
          transformers.AutoModelForCausalLM loads (written shard by shard, one layer's
          experts on the host at a time);
  native: the compact shared-core form, which moedistill.hf.load_model opens.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from moedistill import hf
from moedistill.errors import ConfigError, cli_main

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


@cli_main
def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m moedistill.export", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="native or HF checkpoint directory")
  ap.add_argument("--out", required=True)
  ap.add_argument("--format", default="merged", help="merged (default) or native")
  ap.add_argument("--max_shard_bytes", type=int, default=5 * 2**30)
  ap.add_argument("--overwrite", action="store_true")
  a = ap.parse_args(argv)
  out = export(a.checkpoint, a.out, fmt=a.format, overwrite=a.overwrite,
               max_shard_bytes=a.max_shard_bytes)
  print(f"wrote {out} ({a.format})")


if __name__ == "__main__":
  main()
