"""Bridges compared: every kind of config.model.bridge trained on the same task with the same budget.

  python bench/bridges.py [--config configs/shapes_tiny.py] [--kinds linear,perceiver,...]
                          [--steps N] [--json-out FILE] [--config.KEY=VALUE ...]

One run per bridge kind (vlm_jax.models.bridge.BRIDGES), each in a fresh temporary workdir and
trained exactly as `vlm-jax train` trains the config (default: shapes_tiny, 1600 steps of 32),
with the bridge settings of SETTINGS below; the --config.KEY=VALUE overrides apply to every run.
The only eval is the final one (eval_every = steps) and the only checkpoint the last one.
Reports per kind: held-out accuracy on the config's first eval (shapes:test, 256 examples; per
question kind where the eval gives accuracy/<kind>), visual tokens per image, bridge params (all
params under bridge/), the median train step time in ms over the steady-state log intervals of
metrics.jsonl (the first interval after compile is left out; runs of fewer than 5 log intervals
log every steps/10 steps instead, so that there are some), and the run's wall seconds (compile,
data, eval and checkpoint included). One JSON line per kind as it finishes (also appended to
--json-out, so a killed bench keeps what it finished), then a Markdown table.
"""

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time

# Bridge fields per kind, on top of the config's config.model.bridge (--config.model.bridge.* wins).
SETTINGS = {
    "linear": {},
    "mlp2x_gelu": {},
    "perceiver": {"num_latents": 16},
    "qformer": {"num_queries": 16},
    "cabstractor": {"num_tokens": 9},  # 3x3 pooled from shapes_tiny's 4x4 patch grid: windows overlap
    "pixel_shuffle": {"factor": 2},    # 2x2 patches a token: 4 tokens
}


def step_ms(workdir: str, tokens_per_step: int) -> float | None:
  """Median ms a step over metrics.jsonl's log intervals, the first (right after compile) left out."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [m["train/tokens_per_s"] for m in map(json.loads, f) if "train/tokens_per_s" in m]
  ms = [1000 * tokens_per_step / r for r in rates if r > 0]
  return round(statistics.median(ms[1:] if len(ms) > 1 else ms), 1) if ms else None


def run_kind(kind: str, args, overrides: dict) -> dict:
  from vlm_jax import build as build_lib
  from vlm_jax import config as config_lib
  from vlm_jax.convert import hf_import
  from vlm_jax.eval import runner
  from vlm_jax.models import vlm
  from vlm_jax.train import loop

  config = config_lib.load_file(args.config)
  config.model.bridge.kind = kind
  config.model.bridge.update(SETTINGS.get(kind, {}))
  config_lib.apply_overrides(config, overrides)
  if config.model.bridge.kind != kind:
    raise SystemExit("--config.model.bridge.kind: the bench sets the kind itself (--kinds)")
  t = config.train
  t.steps = args.steps or t.steps
  if t.steps // t.log_every < 5:
    t.log_every = max(1, t.steps // 10)
  t.eval_every = t.checkpoint_every = t.steps
  for entry in config.evals.values():
    entry.every = t.steps
  name = next(iter(config.evals))  # the config's first eval is reported
  bridge_params = []

  def evals(run, tokenizer):  # what api.train passes, plus a look at the bridge's params
    bridge_params.append(sum(math.prod(x.shape) for k, x in build_lib.flat_params(run.abstract_params).items()
                             if k.startswith("bridge/")))
    return runner.periodic_evals(run, tokenizer)

  with tempfile.TemporaryDirectory(prefix="bench_bridges_") as workdir:
    t0 = time.perf_counter()
    metrics = loop.train(config, workdir, evals=evals, load_params=hf_import.load_params)
    wall = time.perf_counter() - t0
    ms = step_ms(workdir, t.batch_size * config.data.seq_len)
  key = f"eval/{name}/"
  return {"kind": kind, "settings": SETTINGS.get(kind, {}), "steps": t.steps, "eval": name,
          "accuracy": round(metrics[key + "accuracy"], 4),
          **{k[len(key):]: round(v, 4) for k, v in metrics.items() if k.startswith(key + "accuracy/")},
          "visual_tokens": vlm.image_tokens(config.model), "bridge_params": bridge_params[0],
          "step_ms": ms, "wall_s": round(wall, 1)}


def main() -> int:
  from vlm_jax import cli
  from vlm_jax.models.bridge import BRIDGES
  argv, overrides = cli.split_overrides(sys.argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
  p.add_argument("--kinds", default=",".join(BRIDGES))
  p.add_argument("--steps", type=int, default=0, help="0: the config's train.steps")
  p.add_argument("--json-out", default="")
  args = p.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = [k for k in kinds if k not in BRIDGES]
  if unknown:
    p.error(f"--kinds: {', '.join(unknown)} not in {', '.join(BRIDGES)}")
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  results = []
  for kind in kinds:
    r = {"config": args.config, "overrides": overrides, **run_kind(kind, args, overrides)}
    results.append(r)
    print(json.dumps(r), flush=True)
    if args.json_out:
      with open(args.json_out, "a") as f:
        f.write(json.dumps(r) + "\n")

  print("\n| Bridge | Visual tokens | Bridge params | Step (ms) | Held-out accuracy | Wall (s) |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in results:
    per_kind = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in r.items() if k.startswith("accuracy/"))
    print(f"| {r['kind']} | {r['visual_tokens']} | {r['bridge_params']:,} | {r['step_ms']} | "
          f"{r['accuracy']:.4f}{f' ({per_kind})' if per_kind else ''} | {r['wall_s']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
