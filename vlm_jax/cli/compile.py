"""`vlm-jax compile`: the train step (and generation) compiled for a TPU slice or a GPU, and
whether it fits; see vlm_jax.aot."""

import json
import os
import sys

from vlm_jax.cli import common
from vlm_jax.errors import UserError


def run(argv: list[str]) -> int:
  argv, overrides = common.split_overrides(argv)
  p = common.Parser(prog="vlm-jax compile")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument(
    "--topology",
    required=True,
    help="a TPU slice: v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:2x2, ...; "
    "or gpu:GB, one GPU of GB gigabytes (an estimate from this machine's CPU compiler)",
  )
  p.add_argument(
    "--decode-rows",
    type=int,
    default=8,
    help="also compile generation for this many prompts of data.seq_len tokens (0: the train step only)",
  )
  p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per prompt (with --decode-rows)")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  for flag, value in (("--decode-rows", args.decode_rows), ("--decode-tokens", args.decode_tokens)):
    if value < 0 or (flag == "--decode-tokens" and value < 1):
      raise UserError(f"{flag} must be >= {0 if flag == '--decode-rows' else 1}, got {value}")
  config = common.load_config(args.config, overrides)
  import jax

  # The target is libtpu's description of the slice; this machine's own devices are not needed
  # (and on a machine without a TPU, jax would otherwise try to start libtpu's backend).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  from vlm_jax import aot

  generation = (args.decode_rows, args.decode_tokens) if args.decode_rows else None
  if generation and config.model.anyres.enabled:
    print(
      "vlm-jax compile: generation is compiled for one square image a prompt; AnyRes configs get the train step only",
      file=sys.stderr,
    )
    generation = None
  try:
    report = aot.compile_run(config, args.topology, generation)
  except aot.DoesNotFit as e:
    if args.json:
      print(json.dumps(e.to_json()))
    raise UserError(
      f"{args.topology}: does not fit ({e.message}); levers: " + "; ".join(aot.levers_to_fit(config, e.chips))
    ) from None
  print(json.dumps(report.to_json()) if args.json else aot.describe(report))
  if not report.fits:
    raise UserError(
      f"{args.topology}: needs {report.peak_bytes / aot.GIB:.2f} "
      f"GiB per chip (train step {report.total_bytes / aot.GIB:.2f}), more than the "
      f"{report.hbm_bytes / aot.GIB:.2f} GiB HBM of a {report.device_kind}; levers: "
      + "; ".join(aot.levers_to_fit(config, report.chips))
    )
  return 0
