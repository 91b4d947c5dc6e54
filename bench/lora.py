"""LoRA and QLoRA against full tuning: the train step's memory (XLA's compiled memory analysis,
one device) and, at the CPU shape, its step time. One JSON line per (shape, method).

  python bench/lora.py --shape cpu [--steps 3] [--method full --method lora ...]
  python bench/lora.py --shape ref|7b [--method ...] [--lever NAME=VALUE ...]

Every method is stage 2: the bridge trains whole, the ViT is frozen, and the LLM trains whole
(`full`) or through rank-16 adapters (alpha 32) on every linear layer of its blocks
(`llm/layers/(q|k|v|o|gate|up|down)`) over a frozen base stored in fp32 (`lora`), bf16
(`lora-bf16`) or quantized in blocks of 64 inputs (`qlora-int8`, `qlora-nf4`: qwix codes + scales
in the compute dtype). `--lever` adds config overrides to every method (`--lever data.seq_len=1024`).

Shapes: `cpu` is bench/train_step.py's (its random HF LLaVA, imported by our converter, and its
batch of 4 x 1024): compiled, then run for a warm-up step and `--steps` timed ones (median, and
the ratio to `full`). `ref` is configs/bench_ref.py:stage2 (1.1B LLM, 8 x 2048) and `7b`
configs/llava15_ref.py:stage2 (LLaVA-1.5 7B, its remat=full) at batch 1 x 2048: compiled only,
by vlm_jax/aot.py's compile_run for one device of this machine's CPU compiler (`vlm-jax compile
--topology gpu:GB`: an estimate of a GPU's memory, the same buffers but not the GPU compiler's
fusions).

The state is the one training holds: trainer.start on the plain model's params, as with
config.model.init_from (cpu), or its shapes, trainer.abstract_state (ref, 7b). `peak` is what the
step holds live (arguments + outputs not donated + temporaries); `fits_gb`: which of 16, 24 and
80 GB (10^9 bytes, nothing kept for the runtime) it fits. `params_bytes` counts a uint4 code as
a byte (as jax holds them on a CPU device), `params_bytes_packed` as 4 bits (as XLA's memory
analysis counts them, on CPU too).
"""

import argparse
import json
import os
import re
import statistics
import tempfile
import time

import jax
import numpy as np

from vlm_jax import aot, parallel
from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax.data import images as images_lib
from vlm_jax.models import lora
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.optim import FROZEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30
CHIP_GB = (16, 24, 80)
LORA = {"lora.rank": "16", "lora.alpha": "32", "lora.targets": "llm/layers/(q|k|v|o|gate|up|down)"}
METHODS = {
  "full": {},
  "lora": LORA,
  "lora-bf16": {**LORA, "lora.base_dtype": "bfloat16"},
  "qlora-int8": {**LORA, "lora.base_dtype": "int8"},
  "qlora-nf4": {**LORA, "lora.base_dtype": "nf4"},
}
CONFIGS = {
  "ref": ("configs/bench_ref.py:stage2", {}),
  "7b": ("configs/llava15_ref.py:stage2", {"train.batch_size": "1", "train.grad_accum": "1"}),
}


def file_config(shape: str, overrides: dict[str, str]):
  spec, own = CONFIGS[shape]
  config = config_lib.load_file(os.path.join(ROOT, spec))
  config_lib.apply_overrides(config, {**own, **overrides})
  return config


def cpu_config(directory: str, shape: dict, overrides: dict[str, str]):
  """bench/train_step.py's config at its cpu shape (our_step's), and the <image> id."""
  from vlm_jax.convert import hf_import

  config, tokenizer, _ = hf_import.llava_config(directory, "bfloat16" if jax.default_backend() == "gpu" else "float32")
  config.stage, config.data.seq_len, config.train.batch_size = "stage2", shape["seq"], shape["batch"]
  config_lib.apply_overrides(config, overrides)
  return config, tokenizer.image_id


def cpu_batch(config, mesh, shape: dict) -> dict:
  """bench/train_step.py's batch (make_batch: answers supervised) as its our_step puts it on the device."""
  import train_step

  b = train_step.make_batch(shape, "answer")
  ids, labels = b["ids"], b["labels"]
  images = images_lib.Preprocessing.from_config(config).normalize(b["rgb"])[:, None]  # one slot a row
  return jax.device_put(
    {
      "tokens": ids.astype(np.int32),
      "images": images,
      "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy(),
      "segment_ids": np.ones(ids.shape, np.int32),
      "targets": np.roll(ids, -1, axis=1).astype(np.int32),
      "loss_mask": np.concatenate([labels[:, 1:] != -100, np.zeros((len(ids), 1), bool)], axis=1),
    },
    parallel.batch_sharding(mesh),
  )


def nbytes(leaves, packed: bool = False) -> int:
  bits = jax.dtypes.itemsize_bits if packed else lambda d: 8 * np.dtype(d).itemsize
  return sum(x.size * bits(x.dtype) // 8 for x in leaves)


def adapted_base(params: dict) -> dict:
  """The kernels LORA targets (adapted or not), as stored: param count, bytes, bytes per param."""
  pattern = LORA["lora.targets"]
  leaves = {
    p: x
    for p, x in params.items()
    if "/kernel" in p and not lora.is_adapter(p) and re.fullmatch(pattern, p.split("/kernel")[0])
  }
  count = sum(x.size for p, x in leaves.items() if not p.endswith("scale"))  # kernels, or their codes
  stored, packed = nbytes(leaves.values()), nbytes(leaves.values(), packed=True)
  return {
    "params": count,
    "bytes": stored,
    "bytes_packed": packed,
    "bytes_per_param": round(stored / count, 4),
    "bytes_per_param_packed": round(packed / count, 4),
    "dtypes": sorted({str(x.dtype) for x in leaves.values()}),
  }


def sizes(trainer, state: dict) -> dict:
  params = build_lib.flat_params(state["params"])
  labels = build_lib.flat_params(trainer.labels)
  return {
    "params_bytes": nbytes(params.values()),
    "params_bytes_packed": nbytes(params.values(), packed=True),
    "trainable_params": sum(params[p].size for p, label in labels.items() if label != FROZEN),
    "optimizer_bytes": nbytes(jax.tree.leaves(state["opt_state"])),
    "adapter_dtypes": sorted({str(x.dtype) for p, x in params.items() if lora.is_adapter(p)}),
    "adapted_base": adapted_base(params),
  }


def memory(m: aot.Memory) -> dict:
  """XLA's memory analysis (GiB) and the chip sizes the step fits."""
  gib = lambda n: round(n / GIB, 3)
  return {
    "memory_gib": {
      "arguments": gib(m.arguments_bytes),
      "outputs": gib(m.output_bytes),
      "aliased": gib(m.alias_bytes),
      "temp": gib(m.temp_bytes),
      "peak": gib(m.total_bytes),
    },
    "arguments_bytes": m.arguments_bytes,
    "fits_gb": [gb for gb in CHIP_GB if m.total_bytes <= gb * 10**9],
  }


def analyse(config) -> dict:
  """Compile only (`vlm-jax compile --topology gpu:80`): the state's sizes and the step's memory."""
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  trainer = trainer_lib.build(config, mesh, image_token_id=0)
  return {**sizes(trainer, trainer.abstract_state), **memory(aot.compile_run(config, "gpu:80").memory)}


def run_cpu(directory: str, config, image_id: int, shape: dict, steps: int) -> dict:
  """From the imported weights (as init_from): sizes, memory, the warm-up step's loss, the
  median of `steps` steps."""
  from vlm_jax.convert import hf_import

  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  trainer = trainer_lib.build(config, mesh, image_id)
  plain = trainer.run.plain
  state = trainer.start(
    hf_import.read_llava_params(directory, config.model, plain.abstract_params, plain.param_shardings)
  )
  batch = cpu_batch(config, mesh, shape)
  compiled = trainer.train_step.lower(state, batch).compile()
  out = {**sizes(trainer, state), **memory(aot.Memory.of(compiled))}

  def step() -> tuple[float, dict]:
    nonlocal state
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(trainer.train_step(state, batch))
    return time.perf_counter() - start, metrics

  # The jitted step, as training calls it: `compiled` refuses nf4's codes, which jax holds a
  # byte each on CPU while the program takes them packed (a layout mismatch).
  _, metrics = step()  # warm-up
  times = [step()[0] for _ in range(steps)]
  return {**out, "loss": round(float(metrics["train/loss"]), 5), "step_s": round(statistics.median(times), 3)}


def describe(shape: str, method: str, config) -> dict:
  m = config.model
  return {
    "shape": shape,
    "method": method,
    "batch": config.train.batch_size,
    "seq": config.data.seq_len,
    "remat": m.remat,
    "dtype": m.dtype,
    "frozen_dtype": config.train.frozen_dtype,
  }


def guarded(fn, *args) -> dict:
  """fn(*args), or the first line of its error: one method failing lets the others run."""
  try:
    return fn(*args)
  except Exception as e:
    return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--shape", choices=("cpu", *CONFIGS), default="cpu")
  p.add_argument("--method", action="append", choices=METHODS, help="default: all, full first")
  p.add_argument("--steps", type=int, default=3, help="cpu: timed steps after a warm-up step")
  p.add_argument("--lever", action="append", default=[], help="NAME=VALUE config override for every method")
  args = p.parse_args()
  levers = dict(pair.split("=", 1) for pair in args.lever)
  methods = args.method or list(METHODS)
  if args.shape != "cpu":
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")  # as `vlm-jax compile`: no accelerator needed
    for method in methods:
      config = file_config(args.shape, {**METHODS[method], **levers})
      build_lib.validate(config)
      print(json.dumps({**describe(args.shape, method, config), **guarded(analyse, config)}), flush=True)
    return
  from hf_llava import write_llava
  from train_step import SHAPES

  shape, full_step = SHAPES["cpu"], None
  with tempfile.TemporaryDirectory() as directory:
    write_llava(directory, shape)
    for method in methods:
      config, image_id = cpu_config(directory, shape, {**METHODS[method], **levers})
      build_lib.validate(config)
      out = {**describe("cpu", method, config), **guarded(run_cpu, directory, config, image_id, shape, args.steps)}
      full_step = out.get("step_s") if method == "full" else full_step
      out["vs_full"] = round(out["step_s"] / full_step, 3) if full_step and "step_s" in out else None
      print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
