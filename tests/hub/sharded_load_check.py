"""Run as a script on 8 forced CPU devices: hf.load_model into fsdp / expert meshes equals the
one-device load bit for bit, and reads every element from the files once, each device's slice
alone. Prints one JSON line per mesh. Usage: python sharded_load_check.py CHECKPOINT_DIR"""
import json
import os
import sys

flags = os.environ.get("XLA_FLAGS", "")  # the suite's, see conftest

os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

from moedistill import sharding  # noqa: E402
from moedistill.hub import hf, safetensors_io as st  # noqa: E402

READS = []
_get_slice = st.SafetensorsFile.get_slice


def counting(self, key, idx):
  a = _get_slice(self, key, idx)
  READS.append((key, a.size, int(np.prod(self.shape(key)))))
  return a


def main(path):
  st.SafetensorsFile.get_slice = counting
  ref = {k: np.asarray(v) for k, v in hf.state_arrays(hf.load_model(path)[0]).items()}
  for mc in (dict(data=1, fsdp=8), dict(data=1, fsdp=4, expert=2)):
    READS.clear()
    mesh = sharding.make_mesh(sharding.MeshConfig(**mc))
    arrays = hf.state_arrays(hf.load_model(path, put=sharding.sharded_put(mesh))[0])
    experts = [r for r in READS if ".mlp.experts." in r[0]]
    print(json.dumps({
        "mesh": mc,
        "equal": all(np.array_equal(np.asarray(arrays[k]), ref[k]) and
                     arrays[k].dtype == ref[k].dtype for k in ref),
        "elements_read": sum(n for _, n, _ in READS),
        "model_elements": sum(a.size for a in ref.values()),
        # the largest read of one expert tensor, as a fraction of that tensor
        "expert_read_fraction": max(n / full for _, n, full in experts),
        "expert_reads": len(experts),
        "expert_tensors": len({k for k, _, _ in experts}),
    }))


if __name__ == "__main__":
  main(sys.argv[1])
