"""`vlm-jax train`: trains (or resumes) the run of a workdir; see api.train."""

from vlm_jax.cli import common


def run(argv: list[str]) -> int:
  argv, overrides = common.split_overrides(argv)
  p = common.Parser(prog="vlm-jax train")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="training data spec (replaces config.data.sources)")
  p.add_argument("--eval-data", help="eval data spec (replaces config.evals with this one, metric auto)")
  args = p.parse_args(argv)
  config = common.load_config(args.config, overrides, data=args.data, eval_data=args.eval_data)
  common.maybe_distributed()
  from vlm_jax import api

  api.train(config, args.workdir, explicit=overrides)
  return 0
