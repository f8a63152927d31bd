"""Run as a script under 8 forced CPU devices: compress a teacher loaded onto meshes and
compare with the one-device compress. Args: teacher dir. Prints JSON, one entry per mesh."""
import json
import os
import sys

if __name__ == "__main__":  # only as a script: an import must not leak 8 devices to others
  flags = os.environ.get("XLA_FLAGS", "")  # the suite's, see conftest
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moedistill import compress, sharding  # noqa: E402
from moedistill.hub import hf  # noqa: E402
from moedistill.model.shared_core import Compression, merged_experts  # noqa: E402

MESHES = ((1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2))


class Rows:
  """A cache reader's row interface over fixed random rows (11: not a multiple of a batch)."""
  rows = 11

  def __init__(self, vocab):
    g = np.random.default_rng(0)
    self.tokens = g.integers(0, vocab, (self.rows, 16)).astype(np.int32)
    self.segs = np.ones((self.rows, 16), np.int32)
    self.segs[:, 12:] = 2

  def read_rows(self, idx):
    return {"tokens": self.tokens[idx].copy(), "segment_ids": self.segs[idx].copy()}


def run(path):
  comp = Compression(3, 5, 2)
  ref_teacher, _ = hf.load_model(path)
  ref, ref_report = compress.compress_model(ref_teacher, comp)
  ref_arrays = {k: np.asarray(v) for k, v in hf.state_arrays(ref).items()}
  rows = Rows(ref_teacher.config.vocab_size)
  ref_freq = compress.routing_frequency(ref_teacher, rows, batch=4)
  out = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    teacher, _ = hf.load_model(path, put=sharding.sharded_put(mesh))
    student, report = compress.compress_model(teacher, comp, mesh=mesh)
    freq = compress.routing_frequency(teacher, rows, batch=4, mesh=mesh)
    arrays = hf.state_arrays(student)
    rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())  # noqa: E731
    def merged(a, base, q):
      return np.asarray(merged_experts(a[base + ("shared_core", q)], a[base + ("wrapper", f"{q}_a")],
                                       a[base + ("wrapper", f"{q}_b")]))

    experts = [(k[:-2], k[-1]) for k in ref_arrays if k[-2] == "shared_core"]
    report_diff = max(abs(a[q] - b[q]) for a, b in zip(report, ref_report)
                      for q in ("gate", "up", "down"))
    out[str(shape)] = {
        # singular vectors carry float32 noise ~ eps / (gap between singular values); the
        # rank-r reconstruction core + A B does not
        "factors_rel_diff": max(rel(arrays[k], ref_arrays[k]) for k in ref_arrays),
        "merged_rel_diff": max(rel(merged(arrays, *e), merged(ref_arrays, *e))
                               for e in experts),
        "report_diff": report_diff,
        # top-k choices per token: counts equal unless float noise flips a near-tie
        "freq_max_diff": max(float(np.abs(freq[k] - ref_freq[k]).max()) for k in ref_freq),
        "freq_total": sum(float(v.sum()) for v in freq.values()),
        "freq_expected": float(rows.tokens.size * ref_teacher.config.num_experts_per_tok
                               * len(ref_teacher.config.moe_layers)), "keys_equal": arrays.keys() ==
        ref_arrays.keys(),
        # how many devices hold a distinct slice of each wrapper/core param (1 = replicated)
        "min_shards": min(len({str(s.index) for s in v.addressable_shards})
                          for k, v in arrays.items() if "experts" in k),
        "devices": min(len(v.sharding.device_set) for v in arrays.values())}
  return out


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1])))
