"""Does a contrastively pretrained ViT help the VLM? The same VLM run from a random ViT and from
one trained by a contrastive config, with the same budget; the held-out accuracy curves.

  python bench/encoder_pretraining.py [--encoder-config configs/siglip_shapes.py[:clip]]
                                      [--encoder WORKDIR] [--config configs/shapes_tiny.py]
                                      [--eval-every 200] [--json-out FILE] [--config.KEY=VALUE ...]

1. The encoder: `vlm-jax train --config ENCODER_CONFIG` in a fresh temporary workdir (or an
   existing contrastive workdir, --encoder); its final zero-shot accuracies are reported.
2. The VLM config (default: shapes_tiny, its steps and batch) trained twice in fresh workdirs,
   evaluated every --eval-every steps on its first eval: once as it is (random ViT), once with
   config.model.vision.init_from = the encoder. --config.KEY=VALUE overrides apply to both.
Prints one JSON line per run, then a Markdown table: the curves side by side and the first
step each reaches 90%.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time

TARGET = 0.9


def train(config, workdir: str) -> float:
  from vlm_jax import api

  t0 = time.time()
  api.train(config, workdir)
  return time.time() - t0


def evals(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m for m in map(json.loads, f) if any(k.startswith("eval/") for k in m)]


def main() -> int:
  from vlm_jax import cli

  argv, overrides = cli.split_overrides(sys.argv[1:])
  here = os.path.join(os.path.dirname(__file__), "..", "configs")
  p = argparse.ArgumentParser()
  p.add_argument("--encoder-config", default=os.path.join(here, "siglip_shapes.py"))
  p.add_argument("--encoder", default="", help="an existing contrastive workdir (skips step 1)")
  p.add_argument("--config", default=os.path.join(here, "shapes_tiny.py"))
  p.add_argument("--eval-every", type=int, default=200)
  p.add_argument("--json-out", default="")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  from vlm_jax import config as config_lib

  results = []

  def report(result: dict) -> None:
    print(json.dumps(result), flush=True)
    results.append(result)
    if args.json_out:
      with open(args.json_out, "a") as f:
        f.write(json.dumps(result) + "\n")

  with tempfile.TemporaryDirectory() as tmp:
    encoder = args.encoder
    if not encoder:
      encoder = os.path.join(tmp, "encoder")
      seconds = train(config_lib.load_file(args.encoder_config), encoder)
      final = evals(encoder)[-1]
      report(
        {
          "run": "encoder",
          "config": args.encoder_config,
          "seconds": round(seconds),
          **{k.split("/", 2)[-1]: v for k, v in final.items() if k.endswith("accuracy")},
        }
      )
    for name, init_from in (("random ViT", ""), ("pretrained ViT", encoder)):
      config = config_lib.load_file(args.config)
      config_lib.apply_overrides(config, overrides)
      config.train.eval_every = args.eval_every
      config.model.vision.init_from = init_from
      workdir = os.path.join(tmp, name.replace(" ", "_"))
      seconds = train(config, workdir)
      first = next(iter(config.evals))
      curve = {m["step"]: m[f"eval/{first}/accuracy"] for m in evals(workdir) if f"eval/{first}/accuracy" in m}
      reached = next((s for s, a in sorted(curve.items()) if a >= TARGET), None)
      report({"run": name, "seconds": round(seconds), "curve": curve, "steps_to_90": reached})

  vlm_runs = [r for r in results if "curve" in r]
  steps = sorted(set().union(*(r["curve"] for r in vlm_runs)))
  print("\n| Step | " + " | ".join(r["run"] for r in vlm_runs) + " |")
  print("|---:|" + "---:|" * len(vlm_runs))
  for s in steps:
    print(f"| {s} | " + " | ".join(f"{100 * r['curve'][s]:.1f}%" if s in r["curve"] else "" for r in vlm_runs) + " |")
  print("| first step >= 90% | " + " | ".join(str(r["steps_to_90"] or "not reached") for r in vlm_runs) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
