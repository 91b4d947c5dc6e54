"""Time to accuracy: held-out accuracy at the end of a training run, for several seeds, and when it
first reached a target.

  python bench/time_to_accuracy.py [--config configs/shapes_tiny.py] [--seeds 0,1,2] [--target 0.9]
                                   [--eval-every 200] [--config.KEY=VALUE ...]

Trains the config once per seed (`config.seed`: the init, the data order and the held-out set) in a
fresh temporary workdir exactly as `vlm-jax train` does (compile, data, checkpoints included), to its
last step, evaluating every --eval-every steps. Times count from the start of training, without the
time spent in these evals (their cadence is the bench's, not the run's): `seconds` to the end,
`reached_seconds` to the end of the step whose eval first reached the target. One JSON line per eval
(the curve), then one per seed with `seed`, `accuracy` (held-out, at the end) and `seconds`.
Exit status 0 when every seed ends at or above the target.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time


def run_seed(config, seed: int, eval_every: int, target: float) -> dict:
  import jax
  from vlm_jax import config as config_lib
  from vlm_jax.convert import hf_import
  from vlm_jax.eval import runner
  from vlm_jax.train import loop

  config = config_lib.from_json(config.to_json())
  config.seed = seed
  config.train.eval_every = eval_every
  name, entry = next(iter(config_lib.eval_entries(config).items()))  # the config's first eval is timed
  config.evals = {name: dict(entry.to_dict(), every=eval_every)}
  curve, in_evals = [], [0.0]
  start = time.perf_counter()

  def evals(run, tokenizer):
    (periodic,) = runner.periodic_evals(run, tokenizer)
    evaluate = periodic.evaluate

    def timed(params):
      jax.block_until_ready(params)  # the step before this eval is training time
      t0 = time.perf_counter()
      metrics = evaluate(params)
      point = {
        "seed": seed,
        "step": min((len(curve) + 1) * eval_every, config.train.steps),
        "accuracy": round(metrics["accuracy"], 4),
        **{k.split("/")[1]: round(v, 3) for k, v in metrics.items() if k.startswith("accuracy/")},
        "seconds": round(t0 - start - in_evals[0], 1),
      }
      in_evals[0] += time.perf_counter() - t0
      curve.append(point)
      print(json.dumps(point), flush=True)
      return metrics

    return [dataclasses.replace(periodic, evaluate=timed)]

  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir, evals=evals, load_params=hf_import.load_params)
  total = time.perf_counter() - start
  reached = next((p for p in curve if p["accuracy"] >= target), None)
  return {
    "seed": seed,
    "accuracy": curve[-1]["accuracy"],
    "seconds": round(total - in_evals[0], 1),
    "seconds_with_evals": round(total, 1),
    "steps": config.train.steps,
    "target": target,
    "reached_step": reached and reached["step"],
    "reached_seconds": reached and reached["seconds"],
  }


def main() -> int:
  from vlm_jax import cli

  argv, overrides = cli.split_overrides(sys.argv[1:])
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
  p.add_argument("--seeds", default="0", help="comma-separated config.seed values, one run each")
  p.add_argument("--target", type=float, default=0.9)
  p.add_argument("--eval-every", type=int, default=200)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  from vlm_jax import config as config_lib

  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, overrides)
  results = []
  for seed in (int(s) for s in args.seeds.split(",")):
    results.append(run_seed(config, seed, args.eval_every, args.target))
    print(json.dumps({"config": args.config, "overrides": overrides, **results[-1]}), flush=True)
  return 0 if all(r["accuracy"] >= args.target for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
