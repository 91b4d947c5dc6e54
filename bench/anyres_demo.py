"""AnyRes demonstration: does tiling help when the answer is in fine detail?

Trains the same tiny VLM from scratch on `shapes:wide` (one 12-px shape in a 32 x 128..192 px
strip; "What shape is in the image?") twice, with the same steps, batch and learning rate: once
with one 32-px view of the whole image (the shape squashed to 2-3 px across), once with AnyRes
(32-px tiles over grids of 1x1..1x6, plus the base view). Reports held-out accuracy on
`shapes:wide_test` (chance: 1/3) and wall time.

  python bench/anyres_demo.py [--steps 600] [--workdir /tmp/anyres_demo]
"""

import argparse
import json
import os
import shutil
import time

from vlm_jax.config import base, eval_entry
from vlm_jax import api


def demo_config(anyres: bool, steps: int):
  c = base()
  c.model.vision.update(dict(image_size=32, patch_size=16))  # one tile = 2 x 2 patches of a 16-px cell
  c.model.anyres.update(dict(enabled=anyres, grid_pinpoints="(1x1),...,(1x6)"))
  c.data.sources = "shapes:wide"
  c.evals = {"shapes_wide_test": eval_entry("shapes:wide_test")}
  c.data.seq_len = 48  # AnyRes: at most 4 + 2 x 13 image tokens, then one question
  c.train.update(
    dict(
      steps=steps,
      batch_size=32,
      lr=5e-4,
      warmup_steps=50,
      log_every=50,
      eval_every=steps,
      checkpoint_every=steps,
      eval_examples=256,
    )
  )
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--workdir", default="/tmp/anyres_demo")
  args = p.parse_args()
  results = {}
  for name, anyres in (("one_view", False), ("anyres", True)):
    workdir = os.path.join(args.workdir, name)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume
    t0 = time.time()
    metrics = api.train(demo_config(anyres, args.steps), workdir)
    key = "eval/shapes_wide_test/"
    results[name] = {
      "accuracy": round(metrics[key + "accuracy"], 4),
      **{k[len(key) :]: round(v, 4) for k, v in metrics.items() if "accuracy/" in k},
      "seconds": round(time.time() - t0, 1),
      "steps": args.steps,
    }
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
