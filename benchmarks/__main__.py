"""`python -m benchmarks run [--smoke]`: every benchmark module in turn, each in its own
process (its own peak RSS, its own jax devices); the last line of each is its JSON record.
`--smoke` runs each on tiny shapes: a test that every benchmark still runs."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

from absl import app, flags

from benchmarks import common

# Every module of the package is a benchmark (absl flags, `--smoke`, a JSON record as its last
# line) except the shared helpers.
NOT_BENCHMARKS = {"common", "__main__"}
BENCHMARKS = tuple(sorted(m.name for m in pkgutil.iter_modules([str(common.REPO / "benchmarks")])
                          if m.name not in NOT_BENCHMARKS and not m.name.startswith("_")))
flags.DEFINE_bool("smoke", False, "tiny shapes (a test of the scripts, not a measurement)")
flags.DEFINE_list("only", [], f"run only these, of {list(BENCHMARKS)}")
F = flags.FLAGS


def main(argv):
  if argv[1:] != ["run"]:
    raise app.UsageError("usage: python -m benchmarks run [--smoke] [--only=a,b]")
  unknown = sorted(set(F.only) - set(BENCHMARKS))
  if unknown:
    raise app.UsageError(f"--only={','.join(F.only)}: {unknown[0]!r} is no benchmark; "
                         f"expected some of {list(BENCHMARKS)}")
  failed = []
  for name in F.only or BENCHMARKS:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--smoke"] if F.smoke else [])]
    print(f"== {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=common.REPO).returncode != 0:
      failed.append(name)
  if failed:
    sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main)
