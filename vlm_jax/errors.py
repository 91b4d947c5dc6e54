"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
  """Bad input from the user (flag, config field, file, sample), with what and where."""


class BadSample(UserError):
  """One training sample that cannot be used; `reason` is its kind, counted in data/skipped/<reason>."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason
