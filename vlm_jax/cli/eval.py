"""`vlm-jax eval`: a checkpoint scored on a data spec; see api.evaluate."""

import json
import os
import sys

from vlm_jax.cli import common
from vlm_jax.errors import UserError


def run(argv: list[str]) -> int:
  p = common.Parser(prog="vlm-jax eval")
  p.add_argument("--checkpoint", required=True)
  p.add_argument(
    "--data", required=True, help="data spec: llava:FILE.jsonl[:IMAGE_ROOT], tfds:NAME[:SPLIT], shapes:SPLIT"
  )
  p.add_argument(
    "--metric",
    default="auto",
    help="auto | vqa | exact | mc | pope | shapes (auto: from what "
    "the samples carry) | zeroshot (a contrastive model's, and its auto)",
  )
  p.add_argument("--predictions", metavar="FILE.jsonl", help="write each example's prediction and score")
  p.add_argument("--max-examples", type=int, help="the first N samples (default: all; 512 of shapes)")
  p.add_argument("--batch-size", type=int, help="prompts per batch (default: config.train.eval_batch_size)")
  p.add_argument("--max-new-tokens", type=int, help="answer length (default: the metric's)")
  p.add_argument(
    "--shuffle-images",
    action="store_true",
    help="pair each question with another example's image (control: should drop to chance)",
  )
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  for flag, value in (
    ("--max-examples", args.max_examples),
    ("--batch-size", args.batch_size),
    ("--max-new-tokens", args.max_new_tokens),
  ):
    if value is not None and value < 1:
      raise UserError(f"{flag} must be >= 1, got {value}")
  from vlm_jax.eval import metrics as metrics_lib
  from vlm_jax.eval import zeroshot

  if args.metric != zeroshot.METRIC:
    metrics_lib.check_name(args.metric, "--metric")
  if args.predictions and (
    os.path.isdir(args.predictions) or not os.path.isdir(os.path.dirname(os.path.abspath(args.predictions)))
  ):
    raise UserError(f"--predictions {args.predictions}: is a directory, or its folder does not exist")
  import vlm_jax
  from vlm_jax import api
  from vlm_jax.eval.progress import ProgressBar

  model = vlm_jax.load(args.checkpoint)
  if args.predictions and api.scores_zeroshot(model, args.metric):
    raise UserError("--predictions: not for zero-shot classification")
  result = api.evaluate(
    model,
    args.data,
    metric=args.metric,
    max_examples=args.max_examples,
    batch_size=args.batch_size,
    max_new_tokens=args.max_new_tokens,
    shuffle_images=args.shuffle_images,
    progress=ProgressBar("eval"),
    on_metric=lambda metric, why: print(f"metric: {metric} ({why})", file=sys.stderr),
  )
  if args.predictions:
    with open(args.predictions, "w", encoding="utf-8") as f:
      for record in result.records:
        f.write(json.dumps(record) + "\n")
  common.print_metrics(result.metrics, args.json)
  return 0
