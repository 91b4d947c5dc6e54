"""Per-chip memory and compile time of the train step for a TPU slice, lever by lever, from the
TPU compiler (`vlm-jax compile`, libtpu; no TPU needed). One JSON line per run.

  python bench/compile_levers.py levers [--config configs/bench_ref.py:stage2] [--topology v5e:2x2]
  python bench/compile_levers.py largest --config configs/llava15_ref.py:stage2 --topology v5e:4x4
                                 [--lever model.remat=full ...]

`levers`: the config as it is, then each lever alone on top of it. `largest`: per-chip rows
doubled from 1 until the step no longer fits (`train.batch_size` = rows x chips; the sequence is
the config's `data.seq_len`). Each compile runs in its own process. Step times are roofline bounds
(model FLOPs at the chip's peak), not measurements.
"""

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVERS = {
  "attention=xla": ["model.attention=xla"],
  "remat=full": ["model.remat=full"],
  "remat=dots": ["model.remat=dots"],
  "remat=dots_with_no_batch_dims": ["model.remat=dots_with_no_batch_dims"],
  "remat=offload": ["model.remat=offload"],
  "unrolled layers": ["model.scan_unroll=0"],
  "full logits": ["model.loss_chunk=0"],
  "frozen params bf16": ["train.frozen_dtype=bfloat16"],
  "images float32": ["data.images_uint8=false"],
  "xla: latency hiding + async collectives": ["xla.latency_hiding_scheduler=true", "xla.async_collectives=true"],
}


def compile_once(config: str, topology: str, overrides: list[str]) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "vlm_jax.cli",
    "compile",
    "--config",
    config,
    "--topology",
    topology,
    "--json",
    "--decode-rows",
    "0",
  ]
  cmd += [f"--config.{o}" for o in overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  lines = out.stdout.strip().splitlines()
  if not lines:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def summary(report: dict) -> dict:
  gib = lambda n: round(n / (1 << 30), 2)
  out = {"fits": report["fits"]}
  if "per_chip" in report:
    per_chip = report["per_chip"]
    out.update(
      total_gib=gib(per_chip["total_bytes"]),
      arguments_gib=gib(per_chip["arguments_bytes"]),
      temp_gib=gib(per_chip["temp_bytes"]),
      hbm_gib=gib(per_chip["hbm_bytes"]),
      roofline_ms=round(report["roofline_step_seconds"] * 1e3, 1),
      compile_s=report["compile_seconds"],
      pallas_kernels=report["pallas_kernels"],
    )
  else:
    out["error"] = report["error"]
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=("levers", "largest"))
  p.add_argument("--config", default="configs/bench_ref.py:stage2")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--lever", action="append", default=[], help="NAME=VALUE config override for every run")
  p.add_argument("--max-rows", type=int, default=64, help="largest: per-chip rows to stop at")
  args = p.parse_args()
  base = ["mesh.data=1", "mesh.fsdp=-1"] + args.lever
  head = {"config": args.config, "topology": args.topology}
  if args.mode == "levers":
    for name, overrides in {"as configured": [], **LEVERS}.items():
      print(
        json.dumps({**head, "lever": name, **summary(compile_once(args.config, args.topology, base + overrides))}),
        flush=True,
      )
    return
  chips = math.prod(int(n) for n in args.topology.partition(":")[2].split("x"))  # v5e:4x4 -> 16
  rows = 1
  while rows <= args.max_rows:
    report = compile_once(args.config, args.topology, base + [f"train.batch_size={rows * chips}"])
    if report["chips"] != chips:
      raise SystemExit(f"{args.topology}: {report['chips']} devices, not {chips}")
    result = summary(report)
    print(json.dumps({**head, "levers": args.lever, "rows_per_chip": rows, **result}), flush=True)
    if not result["fits"]:
      break
    rows *= 2


if __name__ == "__main__":
  main()
