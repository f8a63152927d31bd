"""User-facing errors: each carries one line that names the bad value and what was expected.

Every command runs through `moedistill.cli.run`, which prints a `UserError` as that one line
on stderr (no traceback) and exits with status 2.
"""


class UserError(Exception):
  """Bad input from the user: config values, paths, files, shapes."""


class ConfigError(UserError):
  pass


class CheckpointFileError(UserError):
  pass
