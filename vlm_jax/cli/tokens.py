"""`vlm-jax tokens`: what one image of a size takes in a config's sequence; see api.image_token_report."""

import json

from vlm_jax.cli import common
from vlm_jax.errors import UserError


def _image_size(text: str) -> tuple[int, int]:
  """ "HxW" -> (H, W)."""
  h, x, w = text.lower().partition("x")
  if not (x and h.strip().isdigit() and w.strip().isdigit()):
    raise UserError(f"--image-size {text!r}: expected HxW in pixels, e.g. 600x1000")
  return int(h), int(w)


def run(argv: list[str]) -> int:
  argv, overrides = common.split_overrides(argv)
  p = common.Parser(prog="vlm-jax tokens")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--image-size", required=True, metavar="HxW", help="image height x width in pixels")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  size = _image_size(args.image_size)
  if min(size) < 1:
    raise UserError(f"--image-size {args.image_size!r}: both sides must be >= 1")
  config = common.load_config(args.config, overrides)
  from vlm_jax import api

  counts, line = api.image_token_report(config, size)
  print(json.dumps(counts) if args.json else line)
  return 0
