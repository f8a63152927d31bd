"""Hugging Face safetensors <-> NNX state: the key table, load_model and save_model.

Loading fills an abstract (eval_shape) model param by param, reading only the slices each
device holds; every key and shape is checked first, with a message naming file and key.
Saving streams: one param (for experts: one layer's merged projection) on the host at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moedistill import atomic_io, sharding
from moedistill.errors import CheckpointFileError
from moedistill.hub import safetensors_io as st
from moedistill.model.config import ModelConfig
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
      if k not in files[name]:
        raise CheckpointFileError(f"{path / name}: key {k} listed in the index is missing")
      by_key[k] = files[name]
    return by_key, raw
  if (path / SINGLE).exists():
    f = st.SafetensorsFile(path / SINGLE)
    return {k: f for k in f.keys()}, raw
  raise CheckpointFileError(f"{path}: neither {SINGLE} nor {INDEX} found")


def load_model(path, runtime: Runtime = Runtime(), put: Callable | None = None):
  """Returns (model, config). `put(abstract_var, src) -> jax.Array` places each param, where
  `src` is a LazyParam (`.shape`, `.dtype`, `src[idx]` reads only that slice from the files);
  default: the whole param on the default device. moedistill.sharding.sharded_put(mesh) reads
  each device's shard alone, so no host ever holds more than a param's local slices."""
  by_key, raw = open_checkpoint(path)
  source = str(Path(path) / "config.json")
  cfg = ModelConfig.from_hf_dict(raw, source=source)
  comp = Compression.from_dict(raw["compression"], source) if raw.get("compression") else None
  abstract = nnx.eval_shape(
      lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=runtime, compression=comp))
  graphdef, state = nnx.split(abstract)
  table = key_table(cfg, comp)
  extra = set(by_key) - {e.hf_key for e in table}
  if cfg.tie_word_embeddings:
    extra.discard("lm_head.weight")
  if extra:
    k = sorted(extra)[0]
    raise CheckpointFileError(f"{by_key[k].path}: unexpected key {k} ({len(extra)} unknown keys; "
                              f"not a Qwen3-MoE of this config.json?)")
  put = put or (lambda _, src: jnp.asarray(src[()]))
  flat = dict(nnx.to_flat_state(state))
  groups: dict[tuple, list[Entry]] = {}
  for e in table:
    groups.setdefault(e.path, []).append(e)
  # Every key and shape is checked (headers only) before the first byte of weights is read.
  srcs = [LazyParam(entries, flat[p].shape, by_key, np.dtype(runtime.param_dtype))
          for p, entries in groups.items()]
  for p, src in zip(groups, srcs):
    flat[p].set_value(put(flat[p], src))
    src.close()
  for f in set(by_key.values()):
    f.close()
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


class LazyParam:
  """One param as the checkpoint holds it; `self[idx]` reads only slice `idx` (a tuple of
  slices), cast to `dtype`. A stacked `[e, ...]` param reads only the experts in idx[0],
  each from its own HF tensor; transposed tensors read the transposed slice."""

  def __init__(self, entries: list[Entry], shape, by_key, dtype):
    self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
    self._entries, self._by_key, self._done = entries, by_key, {}
    for e in entries:
      if e.hf_key not in by_key:
        raise CheckpointFileError(f"checkpoint is missing key {e.hf_key}")
      f, want = by_key[e.hf_key], _hf_shape(e, self.shape)
      if f.shape(e.hf_key) != want:
        raise CheckpointFileError(f"{f.path}: key {e.hf_key} has shape "
                                  f"{list(f.shape(e.hf_key))}, expected {list(want)}")

  def __getitem__(self, idx) -> np.ndarray:
    idx = tuple(idx) if isinstance(idx, tuple) else (idx,)
    idx += (slice(None),) * (self.ndim - len(idx))
    # jax asks once per device; devices that share a slice (replicas) share one read.
    key = tuple(s.indices(n) for s, n in zip(idx, self.shape))
    if key not in self._done:
      self._done[key] = self._read_all(idx)
    return self._done[key]

  def _read_all(self, idx) -> np.ndarray:
    if self._entries[0].expert is None:
      return self._read(self._entries[0], idx)
    rows = range(*idx[0].indices(self.shape[0]))
    out = np.empty((len(rows),) + _sliced_shape(self.shape[1:], idx[1:]), self.dtype)
    for i, r in enumerate(rows):
      out[i] = self._read(self._entries[r], idx[1:])
    return out

  def _read(self, e: Entry, idx) -> np.ndarray:
    f = self._by_key[e.hf_key]
    a = f.get_slice(e.hf_key, idx[::-1] if e.transpose else idx)
    return (a.T if e.transpose else a).astype(self.dtype, copy=False)  # a view when no cast

  def close(self):
    """Drops the slices read; each file's mapping goes once it holds RELEASE_BYTES."""
    self._done = {}
    for f in {self._by_key[e.hf_key] for e in self._entries}:
      f.release()


def _sliced_shape(shape, idx) -> tuple:
  return tuple(len(range(*s.indices(n))) for n, s in zip(shape, idx))


def state_arrays(model) -> dict[tuple, jax.Array]:
  return {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@functools.partial(jax.jit, static_argnums=3)
def merge_cast(core_df, a_edr, b_erf, dtype):
  """One layer's W_e = core + A_e B_e for all its experts at once, in float32, cast on the
  devices so that a host receives the result already in the output dtype."""
  f32 = jnp.float32
  return merged_experts(core_df.astype(f32), a_edr.astype(f32), b_erf.astype(f32)).astype(dtype)


def _expert_parts(p) -> tuple[tuple, tuple, tuple]:
  """State paths of (core, A, B) behind a merged `...experts.{gate,up,down}_proj` path."""
  *layer, name = p
  q, base = name.removesuffix("_proj"), tuple(layer)
  return base + ("shared_core", q), base + ("wrapper", f"{q}_a"), base + ("wrapper", f"{q}_b")


def _shape(arrays, p) -> tuple:
  if p in arrays:
    return tuple(arrays[p].shape)
  core, a, _ = _expert_parts(p)
  return (arrays[a].shape[0],) + tuple(arrays[core].shape)


def _fetch(arrays, p, dtype) -> np.ndarray:
  """Param `p` (a merged expert path: that layer's merged stack) on this host, in `dtype`.
  A collective when the arrays span processes: every process fetches in the same order."""
  x = arrays[p].astype(dtype) if p in arrays else merge_cast(
      *(arrays[q] for q in _expert_parts(p)), dtype)
  return sharding.to_host(x) if isinstance(x, jax.Array) else np.asarray(x)


def _plan(table, arrays, itemsize, max_shard_bytes) -> list[list[Entry]]:
  """Consecutive keys grouped into shard files of at most max_shard_bytes (or one tensor)."""
  shards, cur, size = [], [], 0
  for e in table:
    n = int(np.prod(_hf_shape(e, _shape(arrays, e.path)))) * itemsize
    if cur and size + n > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += n
  return shards + [cur]


def _write_shards(arrays, table, out_dir, dtype, max_shard_bytes, writing) -> dict[str, str]:
  """Streams the tensors into shard files; returns the weight map. Holds one stacked param (a
  layer's merged projection) and the tensor being written, whatever the shard size."""
  shards = _plan(table, arrays, dtype.itemsize, max_shard_bytes)
  names = ([SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, held = {}, (None, None)
  for name, entries in zip(names, shards):
    specs = [(e.hf_key, _hf_shape(e, _shape(arrays, e.path)), dtype) for e in entries]
    w = st.StreamWriter(out_dir / name, specs) if writing else None
    for e in entries:
      if held[0] != e.path:  # each param, and each layer's expert merge, fetched once
        held = (None, None)  # free the previous one before the next is fetched
        held = (e.path, _fetch(arrays, e.path, dtype))
      a = held[1][e.expert] if e.expert is not None else held[1]
      if writing:
        w.add(e.hf_key, a.T if e.transpose else a)
      weight_map[e.hf_key] = name
    if writing:
      w.close()
  return weight_map


def save_model(model, path, *, merged: bool = False, max_shard_bytes: int = 5 * 2**30,
               dtype=None, tokenizer_from=None, extra_files: dict[str, str] | None = None):
  """Writes HF safetensors (sharded past max_shard_bytes, with index), config.json and, from
  `tokenizer_from`, the tokenizer files. `dtype` casts on the way out (default: param dtype).
  A compressed model is written in its native compact form, or with `merged=True` as a
  standard Qwen3-MoE that transformers loads (each layer's experts merged once, on device).
  Streams: host memory is one stacked param, not a shard or the model. Params may be sharded over
  processes: then every process calls this (one param is gathered at a time); process 0 writes.
  Written aside and renamed, so a crash never leaves a half checkpoint at `path`."""
  cfg: ModelConfig = model.config
  comp = model.compression
  arrays = state_arrays(model)
  out = jnp.dtype(dtype if dtype is not None else next(iter(arrays.values())).dtype)
  final = Path(path)
  tmp = final.with_name(final.name + ".partial")
  writing = jax.process_index() == 0
  if writing:
    for d in (final, tmp):  # refused before anything is written or deleted
      _check_ours(d)
    _remove_ours(tmp)
    tmp.mkdir(parents=True)
  table = key_table(cfg, None if merged else comp)
  weight_map = _write_shards(arrays, table, tmp, out, max_shard_bytes, writing)
  if not writing:
    return final
  if len(set(weight_map.values())) > 1:
    total = sum(int(np.prod(_hf_shape(e, _shape(arrays, e.path)))) for e in table) * out.itemsize
    (tmp / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  hf = cfg.to_hf_dict()
  hf["torch_dtype"] = str(out)
  if comp is not None and not merged:
    hf["compression"] = comp.to_dict()
  (tmp / "config.json").write_text(json.dumps(hf, indent=2))
  _copy_extras(tmp, tokenizer_from, extra_files)
  _replace(tmp, final)
  return final


def checkpoint_dtype(path):
  """The dtype a Hugging Face checkpoint declares (`torch_dtype`, or `dtype` in newer
  transformers), as a jnp dtype; float32 when it declares none."""
  if not (Path(path) / "config.json").exists():
    raise CheckpointFileError(f"{path}: no config.json, expected a Hugging Face checkpoint")
  raw = json.loads((Path(path) / "config.json").read_text())
  name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
  try:
    return jnp.dtype(name)
  except TypeError:
    raise CheckpointFileError(f"{path}/config.json: torch_dtype={name!r} is not a dtype") from None


def _copy_extras(out_dir, tokenizer_from, extra_files):
  if tokenizer_from is not None:
    for name in TOKENIZER_FILES:
      if (Path(tokenizer_from) / name).exists():
        shutil.copyfile(Path(tokenizer_from) / name, out_dir / name)
  for name, text in (extra_files or {}).items():
    (out_dir / name).write_text(text)


def _replace(tmp: Path, final: Path):
  """Moves the finished `tmp` to `final`; the previous output goes only once `tmp` is in
  its place (swapped atomically where the OS can: never a moment with neither)."""
  old = final.with_name(final.name + ".old")
  _check_ours(final)
  _remove_ours(old)
  atomic_io.replace_dir(tmp, final, old)
  _remove_ours(old)


_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OWN_FILES = frozenset({"config.json", INDEX, SINGLE, "compression_report.json",
                       *TOKENIZER_FILES})


def _foreign(path: Path) -> str | None:
  """The first entry of directory `path` that save_model does not write, or None."""
  for e in sorted(path.iterdir()):
    name = e.name.removesuffix(".tmp")  # a shard being written (safetensors_io)
    if not (e.is_file() and (name in OWN_FILES or _SHARD.fullmatch(name))):
      return e.name
  return None


def _check_ours(path: Path):
  """Refuses to replace or delete a path holding anything save_model did not write."""
  if not path.exists() and not path.is_symlink():
    return
  bad = path.name if not path.is_dir() or path.is_symlink() else _foreign(path)
  if bad is not None:
    raise CheckpointFileError(
        f"{path}: holds {bad}, which moedistill did not write; refusing to replace or delete "
        "it (move it away or choose another path)")


def _remove_ours(path: Path):
  """Deletes a directory save_model wrote (its own file names only, then the directory)."""
  if not path.exists():
    return
  _check_ours(path)
  for e in path.iterdir():
    e.unlink()
  path.rmdir()
