"""Benchmarks: one module per question, each `python -m benchmarks.<name>` with absl flags and
a `--smoke` setting that runs it on tiny shapes; `python -m benchmarks run --smoke` runs them
all (a test). Figures and their commands are recorded in docs/benchmarks.md."""
