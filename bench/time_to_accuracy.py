"""Time to accuracy: wall seconds of a training run until its held-out accuracy first reaches a target.

  python bench/time_to_accuracy.py [--config configs/shapes_tiny.py] [--target 0.9]
                                   [--eval-every 200] [--config.KEY=VALUE ...]

Trains the config in a fresh temporary workdir exactly as `vlm-jax train` does (compile, data,
checkpoints included), but evaluates every --eval-every steps and stops at the first eval that
reaches the target. `seconds` counts from the start of training to the end of that eval's step,
without the time spent in the evals themselves (their cadence is the bench's, not the run's);
`seconds_with_evals` counts them too. One JSON line per eval (the curve), then the result.
"""

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time


def main() -> int:
  from vlm_jax import cli

  argv, overrides = cli.split_overrides(sys.argv[1:])
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
  p.add_argument("--target", type=float, default=0.9)
  p.add_argument("--eval-every", type=int, default=200)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  import jax
  from vlm_jax import config as config_lib
  from vlm_jax.convert import hf_import
  from vlm_jax.eval import runner
  from vlm_jax.train import loop

  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, overrides)
  config.train.eval_every = args.eval_every
  name, entry = next(iter(config_lib.eval_entries(config).items()))  # the config's first eval is timed
  config.evals = {name: dict(entry.to_dict(), every=args.eval_every)}
  metric = f"eval/{name}/accuracy"
  curve, in_evals, reached = [], [0.0], [None]
  start = time.perf_counter()

  def evals(run, tokenizer):
    (periodic,) = runner.periodic_evals(run, tokenizer)
    evaluate = periodic.evaluate

    def timed(params):
      jax.block_until_ready(params)  # the step before this eval is training time
      t0 = time.perf_counter()
      metrics = evaluate(params)
      point = {
        "step": min((len(curve) + 1) * args.eval_every, config.train.steps),
        "accuracy": round(metrics["accuracy"], 4),
        **{k.split("/")[1]: round(v, 3) for k, v in metrics.items() if k.startswith("accuracy/")},
        "seconds": round(t0 - start - in_evals[0], 1),
      }
      in_evals[0] += time.perf_counter() - t0
      point["seconds_with_evals"] = round(time.perf_counter() - start, 1)
      curve.append(point)
      print(json.dumps(point), flush=True)
      if reached[0] is None and metrics["accuracy"] >= args.target:
        reached[0] = point
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's clean stop: it checkpoints and returns
      return metrics

    return [dataclasses.replace(periodic, evaluate=timed)]

  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir, evals=evals, load_params=hf_import.load_params)
  result = {
    "config": args.config,
    "overrides": overrides,
    "target": args.target,
    "metric": metric,
    "reached": reached[0] is not None,
    "seconds": reached[0]["seconds"] if reached[0] else None,
    "seconds_with_evals": reached[0]["seconds_with_evals"] if reached[0] else None,
    "evals": len(curve),
    "eval_every": args.eval_every,
  }
  print(json.dumps(result), flush=True)
  return 0 if reached[0] else 1


if __name__ == "__main__":
  sys.exit(main())
