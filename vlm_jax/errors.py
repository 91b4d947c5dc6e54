"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
  """Bad input from the user (flag, config field, file, sample), with what and where."""
