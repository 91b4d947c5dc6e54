"""`vlm-jax data`: a config's training samples as the model sees them, or one pass's totals."""

import json

from vlm_jax.cli import common


def run(argv: list[str]) -> int:
  argv, overrides = common.split_overrides(argv)
  p = common.Parser(prog="vlm-jax data")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--data", help="data spec (default: the config's data.sources)")
  p.add_argument("--n", type=int, default=3, help="samples to print")
  p.add_argument("--limit", type=int, help="with --json: at most this many samples of each source")
  p.add_argument("--json", action="store_true", help="one pass over the data; one JSON summary on stdout")
  args = p.parse_args(argv)
  config = common.load_config(args.config, overrides, data=args.data)
  from vlm_jax.data import report
  from vlm_jax.data.tokenizer import Tokenizer
  from vlm_jax.models.vlm import image_tokens

  tokenizer = Tokenizer.load(config.data.tokenizer)
  items = report.samples(
    config, tokenizer, image_tokens(config.model), config.data.sources, limit=args.limit if args.json else None
  )
  if args.json:
    print(json.dumps(report.pass_totals(items, tokenizer.image_id).to_json()))
  else:
    report.print_samples(items, tokenizer, args.n)
  return 0
