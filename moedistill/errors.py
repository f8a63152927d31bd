"""User-facing errors: each carries one line that names the bad value and what was expected.

Every command runs through `moedistill.cli.run`, which prints a `UserError` as that one line
on stderr (no traceback) and exits with status 2.
"""
import re


class UserError(Exception):
  """Bad input from the user: config values, paths, files, shapes."""


class ConfigError(UserError):
  pass


class CheckpointFileError(UserError):
  pass


def reason(e: BaseException) -> str:
  """An exception's message as one line for a refusal: its first line, whole (a cut would
  leave half a word, "Truncated Zstd-compres"), without TensorStore's trailing
  payloads (`[source locations=...]`, `[tensorstore_spec=...]`: its C++ file:line and the
  whole open spec, nothing the user can act on and often longer than the reason itself).
  The exception's type stands in for an empty message."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return re.sub(r"\s\[[a-z][a-z_ ]*=.*$", "", lines[0])
