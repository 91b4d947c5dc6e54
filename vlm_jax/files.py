"""Reading the JSON files users and checkpoints bring, with one-line errors naming the file."""

import json
import os

from vlm_jax.errors import UserError


def read_json(directory: str, name: str = "config.json", required: bool = True) -> dict | None:
  """DIRECTORY/NAME parsed; None when it is absent and not required."""
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    if required:
      raise UserError(f"{directory}: no {name} (not a Hugging Face model directory?)")
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None


def check_empty_dir(path: str, flag: str) -> None:
  """An output directory must be new or empty: nothing a user wrote is overwritten."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise UserError(f"{flag} {path} exists and is not an empty directory")
