"""User-facing errors: each carries one line that names the bad value and what was expected.

CLIs catch `UserError` in `cli_main` and print just that line (no traceback), exit 2.
"""
import functools
import sys


class UserError(Exception):
  """Bad input from the user: config values, paths, files, shapes."""


class ConfigError(UserError):
  pass


class CheckpointFileError(UserError):
  pass


def cli_main(fn):
  """Wrap a CLI entry point: a UserError becomes one stderr line and exit status 2."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped
