"""Hugging Face safetensors <-> NNX state: the key table, load_model and save_model.

Loading is tensor by tensor into an abstract (eval_shape) model, so a checkpoint is never held
twice in host memory; every key and shape is checked with a message naming file and key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moedistill import safetensors_io as st
from moedistill.errors import CheckpointFileError
from moedistill.model.config import ModelConfig
from moedistill.model import moe
from moedistill.model.layers import Runtime
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.model.shared_core import PROJS, Compression, merged_experts

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_key: str
  path: tuple            # path in the NNX state
  transpose: bool        # torch Linear weight [out, in] <-> our kernel [in, out]
  expert: int | None = None  # row of a stacked [e, ...] param


def key_table(cfg: ModelConfig, comp: Compression | None = None) -> list[Entry]:
  """HF keys in file order. With `comp`, MoE experts use the native compact keys
  (`model.layers.N.mlp.experts.shared_core.gate`, `....wrapper.gate_a`: our layout as is)."""
  t = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), False)]
  for i in range(cfg.num_hidden_layers):
    p, L = f"model.layers.{i}.", ("layers", i)
    t += [Entry(p + "input_layernorm.weight", L + ("input_layernorm", "scale"), False),
          Entry(p + "post_attention_layernorm.weight", L + ("post_attention_layernorm", "scale"),
                False)]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      t.append(Entry(p + f"self_attn.{name}.weight", L + ("self_attn", name, "kernel"), True))
      if cfg.attention_bias:
        t.append(Entry(p + f"self_attn.{name}.bias", L + ("self_attn", name, "bias"), False))
    for name in ("q_norm", "k_norm"):
      t.append(Entry(p + f"self_attn.{name}.weight", L + ("self_attn", name, "scale"), False))
    if cfg.is_moe_layer(i):
      t.append(Entry(p + "mlp.gate.weight", L + ("mlp", "gate", "kernel"), True))
      if comp is not None:
        for q in PROJS:
          for sub in (("shared_core", q), ("wrapper", f"{q}_a"), ("wrapper", f"{q}_b")):
            t.append(Entry(p + "mlp.experts." + ".".join(sub), L + ("mlp", "experts") + sub, False))
        continue
      for name in ("gate_proj", "up_proj", "down_proj"):
        t += [Entry(p + f"mlp.experts.{e}.{name}.weight", L + ("mlp", "experts", name), True, e)
              for e in range(cfg.num_experts)]
    else:
      t += [Entry(p + f"mlp.{name}.weight", L + ("mlp", name, "kernel"), True)
            for name in ("gate_proj", "up_proj", "down_proj")]
  t.append(Entry("model.norm.weight", ("norm", "scale"), False))
  if not cfg.tie_word_embeddings:
    t.append(Entry("lm_head.weight", ("lm_head", "kernel"), True))
  return t


def _hf_shape(entry: Entry, shape: tuple) -> tuple:
  s = shape[1:] if entry.expert is not None else shape
  return tuple(reversed(s)) if entry.transpose else tuple(s)


def open_checkpoint(path) -> tuple[dict[str, st.SafetensorsFile], dict]:
  """Returns ({hf_key: file}, raw config dict) for a single-file or sharded checkpoint."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointFileError(f"{path}: not a directory, expected a Hugging Face checkpoint")
  if not (path / "config.json").exists():
    raise CheckpointFileError(f"{path}: no config.json, expected a Hugging Face checkpoint")
  raw = json.loads((path / "config.json").read_text())
  if (path / INDEX).exists():
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    files = {}
    for name in sorted(set(weight_map.values())):
      if not (path / name).exists():
        raise CheckpointFileError(f"{path / INDEX}: names shard {name}, which does not exist")
      files[name] = st.SafetensorsFile(path / name)
    by_key = {}
    for k, name in weight_map.items():
      if k not in files[name].header:
        raise CheckpointFileError(f"{path / name}: key {k} listed in the index is missing")
      by_key[k] = files[name]
    return by_key, raw
  if (path / SINGLE).exists():
    f = st.SafetensorsFile(path / SINGLE)
    return {k: f for k in f.keys()}, raw
  raise CheckpointFileError(f"{path}: neither {SINGLE} nor {INDEX} found")


def load_model(path, *, dtype=jnp.float32, param_dtype=jnp.float32, moe_backend="ragged",
               capacity_factor=1.25, remat="none", put: Callable | None = None):
  """Returns (model, config). `put(abstract_var, np_array) -> jax.Array` places each param
  (default: jnp.asarray); moedistill.sharding.sharded_put(mesh) shards it over a mesh."""
  by_key, raw = open_checkpoint(path)
  source = str(Path(path) / "config.json")
  cfg = ModelConfig.from_hf_dict(raw, source=source)
  comp = Compression.from_dict(raw["compression"], source) if raw.get("compression") else None
  rt = Runtime(dtype=dtype, param_dtype=param_dtype, moe_backend=moe.resolve_backend(moe_backend),
               capacity_factor=capacity_factor, remat=remat)
  abstract = nnx.eval_shape(
      lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt, compression=comp))
  graphdef, state = nnx.split(abstract)
  table = key_table(cfg, comp)
  extra = set(by_key) - {e.hf_key for e in table}
  if cfg.tie_word_embeddings:
    extra.discard("lm_head.weight")
  if extra:
    k = sorted(extra)[0]
    raise CheckpointFileError(f"{by_key[k].path}: unexpected key {k} ({len(extra)} unknown keys; "
                              f"not a Qwen3-MoE of this config.json?)")
  put = put or (lambda _, a: jnp.asarray(a))
  flat = dict(nnx.to_flat_state(state))
  groups: dict[tuple, list[Entry]] = {}
  for e in table:
    groups.setdefault(e.path, []).append(e)
  for p, entries in groups.items():
    var = flat[p]
    arr = _assemble(entries, var.shape, by_key, np.dtype(param_dtype))
    var.set_value(put(var, arr))
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


def _assemble(entries, shape, by_key, dtype) -> np.ndarray:
  out = np.empty(shape, dtype) if entries[0].expert is not None else None
  for e in entries:
    if e.hf_key not in by_key:
      raise CheckpointFileError(f"checkpoint is missing key {e.hf_key}")
    f = by_key[e.hf_key]
    want = _hf_shape(e, shape)
    if f.shape(e.hf_key) != want:
      raise CheckpointFileError(f"{f.path}: key {e.hf_key} has shape {list(f.shape(e.hf_key))}, "
                                f"expected {list(want)}")
    a = f.get(e.hf_key)
    a = a.T if e.transpose else a
    if out is None:
      return a.astype(dtype)
    out[e.expert] = a
  return out


def state_arrays(model) -> dict[tuple, jax.Array]:
  return {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class _MergedView(dict):
  """State arrays plus the dense expert paths, each W_e = core + A_e B_e computed on demand."""

  def __missing__(self, p):
    *layer, name = p
    q = name.removesuffix("_proj")
    if not (layer and layer[-1] == "experts" and q in PROJS):
      raise KeyError(p)
    base = tuple(layer)
    return merged_experts(self[base + ("shared_core", q)], self[base + ("wrapper", f"{q}_a")],
                          self[base + ("wrapper", f"{q}_b")])


def save_model(model, path, *, merged: bool = False, max_shard_bytes: int = 5 * 2**30,
               dtype=None, tokenizer_from=None, extra_files: dict[str, str] | None = None):
  """Writes HF safetensors (sharded past max_shard_bytes, with index), config.json and, from
  `tokenizer_from`, the tokenizer files. `dtype` casts on the way out (default: param dtype).
  A compressed model is written in its native compact form, or with `merged=True` as a
  standard Qwen3-MoE that transformers loads (one layer's W_e on the host at a time)."""
  cfg: ModelConfig = model.config
  comp = model.compression
  arrays = _MergedView(state_arrays(model))
  extra_config = {}
  if comp is not None and not merged:
    extra_config["compression"] = comp.to_dict()
  table = key_table(cfg, None if merged else comp)
  final = Path(path)
  # Written aside and renamed at the end: a crash never leaves a half checkpoint at `path`.
  path = final.with_name(final.name + ".partial")
  shutil.rmtree(path, ignore_errors=True)
  path.mkdir(parents=True)
  shards, cur, size = [], [], 0
  for e in table:
    a = arrays[e.path]
    n = int(np.prod(a.shape[1:] if e.expert is not None else a.shape)) * (
        np.dtype(dtype or a.dtype).itemsize)
    if cur and size + n > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += n
  shards.append(cur)
  names = ([SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  host = {}
  for name, entries in zip(names, shards):
    tensors = {}
    for e in entries:
      if e.path not in host:  # fetch a stacked param once, keep only while its shard is open
        host = {e.path: np.asarray(jax.device_get(arrays[e.path]))}
      a = host[e.path]
      a = a[e.expert] if e.expert is not None else a
      a = np.ascontiguousarray(a.T if e.transpose else a)
      tensors[e.hf_key] = a.astype(dtype) if dtype is not None else a
      weight_map[e.hf_key] = name
      total += tensors[e.hf_key].nbytes
    st.write(path / name, tensors)
  if len(shards) > 1:
    (path / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  hf = cfg.to_hf_dict()
  hf["torch_dtype"] = str(np.dtype(dtype or next(iter(arrays.values())).dtype))
  hf.update(extra_config)
  (path / "config.json").write_text(json.dumps(hf, indent=2))
  if tokenizer_from is not None:
    for name in TOKENIZER_FILES:
      if (Path(tokenizer_from) / name).exists():
        shutil.copyfile(Path(tokenizer_from) / name, path / name)
  for name, text in (extra_files or {}).items():
    (path / name).write_text(text)
  old = final.with_name(final.name + ".old")
  if final.exists():  # the previous output is removed only once the new one is complete
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
  os.replace(path, final)
  shutil.rmtree(old, ignore_errors=True)
  return final
