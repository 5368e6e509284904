"""Errors caused by the user's input. The CLI prints them as one line, no traceback."""


class UserError(Exception):
  """Bad input: the message names the problem (file, key or value) and the fix."""


class ConfigError(UserError, ValueError):
  """A configuration value that cannot work."""


class DataError(UserError):
  """Missing, empty or malformed data, or a tokenizer that does not fit the model."""


class CheckpointError(UserError):
  """A workdir or checkpoint that cannot be used for this run."""
