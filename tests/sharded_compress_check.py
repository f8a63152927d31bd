"""Run as a script under 8 forced CPU devices: compress a teacher loaded onto meshes and
compare with the one-device compress. Args: teacher dir. Prints JSON, one entry per mesh."""
import json
import os
import sys

if __name__ == "__main__":  # only as a script: an import must not leak 8 devices to others
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moedistill import compress, sharding  # noqa: E402
from moedistill.hub import hf
from moedistill.model.shared_core import Compression, merged_experts  # noqa: E402

MESHES = ((1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2))


def run(path):
  comp = Compression(3, 5, 2)
  ref_teacher, _ = hf.load_model(path)
  ref, ref_report = compress.compress_model(ref_teacher, comp)
  ref_arrays = {k: np.asarray(v) for k, v in hf.state_arrays(ref).items()}
  out = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    teacher, _ = hf.load_model(path, put=sharding.sharded_put(mesh))
    student, report = compress.compress_model(teacher, comp, mesh=mesh)
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
        "report_diff": report_diff, "keys_equal": arrays.keys() ==
        ref_arrays.keys(),
        # how many devices hold a distinct slice of each wrapper/core param (1 = replicated)
        "min_shards": min(len({str(s.index) for s in v.addressable_shards})
                          for k, v in arrays.items() if "experts" in k),
        "devices": min(len(v.sharding.device_set) for v in arrays.values())}
  return out


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1])))
