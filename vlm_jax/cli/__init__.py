"""`vlm-jax COMMAND ...`: each command a module of this package with `run(argv) -> int`. Bad input
-> one line on stderr, exit status 2."""

import logging
import sys

# eval and compile: the command modules (the builtins are not used here)
from vlm_jax.cli import chat, compile, convert, data, eval, generate, tokens, train
from vlm_jax.cli.common import split_overrides
from vlm_jax.errors import UserError

__all__ = ["COMMANDS", "main", "split_overrides"]  # split_overrides: bench/ scripts read --config.KEY=VALUE so

COMMANDS = {
  "train": train,
  "eval": eval,
  "generate": generate,
  "chat": chat,
  "convert": convert,
  "tokens": tokens,
  "data": data,
  "compile": compile,
}


def _setup_logging(verbose: bool) -> None:
  logging.basicConfig(
    level=logging.INFO if verbose else logging.WARNING,
    stream=sys.stderr,
    format="%(asctime)s %(message)s",
    datefmt="%H:%M:%S",
  )
  logging.getLogger("vlm_jax").setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
  """The `vlm-jax` console script: runs one command; returns its exit status."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: vlm-jax {{{','.join(COMMANDS)}}} ...  (vlm-jax COMMAND --help for its flags)")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  _setup_logging(verbose=command == "train")
  try:
    if command not in COMMANDS:
      raise UserError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    return COMMANDS[command].run(rest)
  except UserError as e:
    print(f"vlm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("vlm-jax: interrupted", file=sys.stderr)
    return 130
