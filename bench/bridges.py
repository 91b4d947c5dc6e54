"""Bridges compared: every kind of config.model.bridge, cross-attention fusion and token merging,
trained on the same task with the same budget.

  python bench/bridges.py [--config configs/shapes_tiny.py] [--variants linear,cross_attention,...]
                          [--steps N] [--json-out FILE] [--config.KEY=VALUE ...]

One run per variant (VARIANTS below: each bridge kind of vlm_jax.models.bridge.BRIDGES, Flamingo's
cross-attention fusion over a Perceiver resampler, ToMe merging half the ViT's tokens), each in a
fresh temporary workdir and trained exactly as `vlm-jax train` trains the config (default:
shapes_tiny, 1600 steps of 32); the --config.KEY=VALUE overrides apply to every run.
The only eval is the final one (eval_every = steps) and the only checkpoint the last one.
Reports per variant: held-out accuracy on the config's first eval (shapes:test, 256 examples; per
question kind where the eval gives accuracy/<kind>), visual tokens per image (the bridge's), the
tokens an image takes in the LLM's sequence (cross-attention: its one marker), the params the
fusion adds (under bridge/, and the cross-attention blocks), the median train step time in ms
over the steady-state log intervals of metrics.jsonl (the first interval after compile is left
out; runs of fewer than 5 log intervals log every steps/10 steps instead, so that there are
some), and the run's wall seconds (compile, data, eval and checkpoint included). One JSON line per variant as it finishes (also appended to
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

# Config fields per variant, on top of the config's (--config.KEY=VALUE overrides win).
VARIANTS = {
  "linear": {"model.bridge.kind": "linear"},
  "mlp2x_gelu": {"model.bridge.kind": "mlp2x_gelu"},
  "perceiver": {"model.bridge.kind": "perceiver", "model.bridge.num_latents": 16},
  "qformer": {"model.bridge.kind": "qformer", "model.bridge.num_queries": 16},
  # 3x3 pooled from shapes_tiny's 4x4 patch grid: windows overlap
  "cabstractor": {"model.bridge.kind": "cabstractor", "model.bridge.num_tokens": 9},
  "pixel_shuffle": {"model.bridge.kind": "pixel_shuffle", "model.bridge.factor": 2},  # 2x2 patches a token
  # Flamingo: the resampler's 16 tokens an image read by a gated block before every LLM layer
  "cross_attention": {
    "model.fusion": "cross_attention",
    "model.bridge.kind": "perceiver",
    "model.bridge.num_latents": 16,
  },
  # The same blocks reading the per-patch tokens (mlp2x_gelu's) instead of the resampler's
  "cross_attention+patches": {"model.fusion": "cross_attention", "model.bridge.kind": "mlp2x_gelu"},
  # ToMe: 4 merged in each of the 2 ViT blocks, 16 -> 8 tokens
  "mlp2x_gelu+tome": {"model.bridge.kind": "mlp2x_gelu", "model.vision.token_merging": 4},
}


def settings(variant: str) -> str:
  """The variant's fields, short: "num_latents 16, fusion cross_attention"."""
  return ", ".join(f"{k.rsplit('.', 1)[1]} {v}" for k, v in VARIANTS[variant].items() if not k.endswith(".kind"))


def step_ms(workdir: str, tokens_per_step: int) -> float | None:
  """Median ms a step over metrics.jsonl's log intervals, the first (right after compile) left out."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [m["train/tokens_per_s"] for m in map(json.loads, f) if "train/tokens_per_s" in m]
  ms = [1000 * tokens_per_step / r for r in rates if r > 0]
  return round(statistics.median(ms[1:] if len(ms) > 1 else ms), 1) if ms else None


def run_variant(variant: str, args, overrides: dict) -> dict:
  from vlm_jax import build as build_lib
  from vlm_jax import config as config_lib
  from vlm_jax.convert import hf_import
  from vlm_jax.eval import runner
  from vlm_jax.models import vlm
  from vlm_jax.train import loop, optim

  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, {**{k: str(v) for k, v in VARIANTS[variant].items()}, **overrides})
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
    bridge_params.append(
      sum(
        math.prod(x.shape)
        for k, x in build_lib.flat_params(run.abstract_params).items()
        if optim.component(k) == "bridge"
      )
    )
    return runner.periodic_evals(run, tokenizer)

  with tempfile.TemporaryDirectory(prefix="bench_bridges_") as workdir:
    t0 = time.perf_counter()
    metrics = loop.train(config, workdir, evals=evals, load_params=hf_import.load_params)
    wall = time.perf_counter() - t0
    ms = step_ms(workdir, t.batch_size * config.data.seq_len)
  key = f"eval/{name}/"
  return {
    "variant": variant,
    "settings": VARIANTS[variant],
    "steps": t.steps,
    "eval": name,
    "accuracy": round(metrics[key + "accuracy"], 4),
    **{k[len(key) :]: round(v, 4) for k, v in metrics.items() if k.startswith(key + "accuracy/")},
    "visual_tokens": vlm.visual_tokens(config.model),
    "sequence_tokens": vlm.image_tokens(config.model),
    "bridge_params": bridge_params[0],
    "step_ms": ms,
    "wall_s": round(wall, 1),
  }


def main() -> int:
  from vlm_jax import cli

  argv, overrides = cli.split_overrides(sys.argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--steps", type=int, default=0, help="0: the config's train.steps")
  p.add_argument("--json-out", default="")
  args = p.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: {', '.join(unknown)} not in {', '.join(VARIANTS)}")
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  results = []
  for variant in variants:
    r = {"config": args.config, "overrides": overrides, **run_variant(variant, args, overrides)}
    results.append(r)
    print(json.dumps(r), flush=True)
    if args.json_out:
      with open(args.json_out, "a") as f:
        f.write(json.dumps(r) + "\n")

  print(
    "\n| Variant | Settings | Visual tokens | Sequence tokens | Bridge params | Step (ms) | Held-out accuracy "
    "| Wall (s) |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for r in results:
    per_kind = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in r.items() if k.startswith("accuracy/"))
    print(
      f"| {r['variant']} | {settings(r['variant'])} | {r['visual_tokens']} | {r['sequence_tokens']} | "
      f"{r['bridge_params']:,} | {r['step_ms']} | "
      f"{r['accuracy']:.4f}{f' ({per_kind})' if per_kind else ''} | {r['wall_s']} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
