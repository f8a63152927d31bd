"""moedistill: knowledge distillation for compressed Mixture-of-Experts language models."""
import os
import re


def enough_cpu_threads_for_forced_devices():
  """N forced CPU devices on a machine with fewer cores can deadlock XLA:CPU collectives: its
  thunk executor hands independent ready ops (several all-gathers) to one Eigen pool sized by
  the core count, a worker blocks in a collective's rendezvous and the op another device needs
  to reach it waits behind it in the queue (seen: the report's eval after training, 8 devices,
  2 cores, "Termination timeout for all gather"). PJRT_NPROC sizes that pool; it is read when
  the CPU client is created, so this runs at import, before any command touches a backend."""
  m = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  if m and "PJRT_NPROC" not in os.environ and "NPROC" not in os.environ:
    os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 4 * int(m.group(1))))


enough_cpu_threads_for_forced_devices()
