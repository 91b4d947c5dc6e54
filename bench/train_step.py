"""Train-step speed: our jitted step against transformers' LlavaForConditionalGeneration on the same
weights and batch, each system in its own subprocess (so each peak memory is its own).

  python bench/train_step.py --shape cpu|ref --stage stage1|stage2 [--steps N] [--compile]
                             [--lever NAME=VALUE ...]

One random HF LLaVA is written and imported by our converter. The batch is LLaVA-like: per row a
BOS, one image's placeholder tokens, a prompt and an answer; only the answer carries the loss
(about half the text tokens). Both systems first give the loss of that batch at the initial
weights (checked equal: fp32 1e-4), then time `--steps` steps after a warm-up step; the vision
tower is frozen on both sides, stage1 also freezes the LLM. One JSON line per system, then the
ratio (their step time / ours). FLOPs as model_flops (the LLaVA reference baseline's formula); `ceiling_fraction`
is the share of the framework's own dense-matmul rate on this machine that the step reaches.

Levers: `supervise=answer|all` (which text tokens carry the loss), `image_slots=N` (our rows
have N image slots, only the first filled, as packed rows with data.max_images=N; transformers
encodes only real images either way), `xla_flags=...` (added to XLA_FLAGS for our side), any
other NAME=VALUE is a config override for our side (`--lever model.loss_chunk=0` turns the
chunked loss off, `--lever data.image_pool=4` pools the images; see docs/performance.md "Train-step speed").
"""

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
from hf_llava import CPU_SHAPE, write_llava

SHAPES = {
  "cpu": dict(CPU_SHAPE, batch=4, seq=1024),
  # The reference workload: LLaVA-1.5 recipe on a 1.1B LLM (TinyLlama shape), CLIP ViT-L/14-336
  "ref": dict(
    vision=dict(
      hidden_size=1024,
      intermediate_size=4096,
      num_hidden_layers=24,
      num_attention_heads=16,
      image_size=336,
      patch_size=14,
    ),
    text=dict(
      hidden_size=2048,
      intermediate_size=5632,
      num_hidden_layers=22,
      num_attention_heads=32,
      num_key_value_heads=4,
      vocab_size=32000,
      max_position_embeddings=4096,
      rms_norm_eps=1e-5,
    ),
    batch=8,
    seq=2048,
  ),
}
GPU_PEAK_FLOPS = 989e12  # H100/H200 dense bf16, as the reference baseline


PIXEL_MEAN, PIXEL_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def image_tokens(shape: dict) -> int:
  v = shape["vision"]
  return (v["image_size"] // v["patch_size"]) ** 2  # CLIP's CLS dropped ("default" strategy)


def make_batch(shape: dict, supervise: str, seed: int = 0) -> dict[str, np.ndarray]:
  """ids [B, S], labels [B, S] (-100: no loss), rgb uint8 [B, H, W, 3] and pixels, the same
  normalised with PIXEL_MEAN/STD (transformers' input). Row: BOS, the image's placeholders, a
  prompt, an answer; the prompt takes 40-60% of the text."""
  rng = np.random.default_rng(seed)
  b, s, n_img = shape["batch"], shape["seq"], image_tokens(shape)
  vocab = shape["text"]["vocab_size"]
  ids = rng.integers(4, vocab - 1, (b, s))
  ids[:, 0], ids[:, 1 : 1 + n_img] = 1, vocab - 1
  labels = np.full((b, s), -100)
  text = s - 1 - n_img
  for row in range(b):
    first = 1 + n_img if supervise == "all" else 1 + n_img + int(text * rng.uniform(0.4, 0.6))
    labels[row, first:] = ids[row, first:]
  size = shape["vision"]["image_size"]
  rgb = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
  pixels = (rgb.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
  return {"ids": ids, "labels": labels, "rgb": rgb, "pixels": pixels}


def param_counts(directory: str) -> dict[str, int]:
  """Parameters per part, from the safetensors headers (no framework needed)."""
  counts = {"vision": 0, "proj": 0, "lm": 0}
  for name in os.listdir(directory):
    if not name.endswith(".safetensors"):
      continue
    with open(os.path.join(directory, name), "rb") as f:
      header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    for key, info in header.items():
      if key == "__metadata__":
        continue
      part = "vision" if "vision_tower" in key else "proj" if "multi_modal_projector" in key else "lm"
      counts[part] += int(np.prod(info["shape"]))
  return counts


def model_flops(shape: dict, stage: str, counts: dict[str, int]) -> float:
  """The LLaVA reference baseline's formula: frozen vision forward; trained parts fwd+bwd;
  the LLM's backward for activations always (they reach the bridge)."""
  b, s, n_img = shape["batch"], shape["seq"], image_tokens(shape)
  d, layers = shape["text"]["hidden_size"], shape["text"]["num_hidden_layers"]
  vd, vl = shape["vision"]["hidden_size"], shape["vision"]["num_hidden_layers"]
  attn_lm = 12 * layers * d * s * s / 2 * b
  vis = 2 * counts["vision"] * b * (n_img + 1) + 4 * vl * vd * (n_img + 1) ** 2 * b
  lm = (6 if stage == "stage2" else 4) * counts["lm"] * b * s + attn_lm
  return vis + 6 * counts["proj"] * b * n_img + lm


def our_images(images: np.ndarray, n: int, slots: int, pool: int, groups: int) -> "np.ndarray | dict":
  """Each row's image [B, H, W, 3] (n tokens) -> our input: [B, slots, H, W, 3] with slots - 1
  empty ones, or with data.image_pool the pooled form (data/packing.py ImagePool): only the images."""
  b = len(images)
  if not pool:
    return np.concatenate([images[:, None], np.zeros((b, slots - 1) + images.shape[1:], images.dtype)], axis=1)
  if pool < b or pool % groups:
    raise SystemExit(f"--lever data.image_pool={pool}: the bench needs a multiple of {groups} >= the {b} images")
  rows = b // groups
  index = np.zeros((b, slots * n), np.int32)
  index[:, :n] = (np.arange(b) % rows)[:, None] * n + np.arange(n)
  pooled = np.zeros((groups, pool // groups) + images.shape[1:], images.dtype)
  pooled[:, :rows] = images.reshape((groups, rows) + images.shape[1:])
  return {"pool": pooled, "index": index}


def our_step(directory: str, shape: dict, stage: str, batch: dict, overrides: dict[str, str], slots: int = 1):
  """-> step(): one of our train steps on the batch, blocking until done; returns its metrics."""
  import jax
  from vlm_jax import build as build_lib
  from vlm_jax import config as config_lib
  from vlm_jax import parallel
  from vlm_jax.convert import hf_import
  from vlm_jax.data import images as images_lib
  from vlm_jax.train import trainer as trainer_lib

  on_gpu = jax.default_backend() == "gpu"
  config, tokenizer, _ = hf_import.llava_config(directory, "bfloat16" if on_gpu else "float32")
  config.stage = stage
  config.data.seq_len = shape["seq"]
  t = config.train
  t.batch_size, t.lr, t.warmup_steps, t.steps, t.weight_decay, t.b2 = shape["batch"], 1e-5, 0, 1000, 0.01, 0.999
  config.data.image_mean, config.data.image_std = PIXEL_MEAN, PIXEL_STD
  config_lib.apply_overrides(config, overrides)
  build_lib.validate(config)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  mesh = parallel.make_mesh(config.mesh)
  run = build_lib.build(config, mesh, tokenizer.image_id)
  params = hf_import.read_llava_params(directory, config.model, run.abstract_params, run.param_shardings)
  trainer = trainer_lib.make(run)
  state = trainer.start(params)
  del params
  ids, labels = batch["ids"], batch["labels"]
  length = ids.shape[1]
  # data.images_uint8 decides what crosses to the device, as in training
  images = images_lib.Preprocessing.from_config(config).normalize(batch["rgb"])
  images = our_images(images, image_tokens(shape), slots, config.data.image_pool, parallel.batch_divisor(mesh))
  arrays = {
    "tokens": ids.astype(np.int32),
    "images": images,
    "positions": np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy(),
    "segment_ids": np.ones(ids.shape, np.int32),
    # position t predicts token t + 1: transformers' shifted labels
    "targets": np.concatenate([ids[:, 1:], ids[:, :1]], axis=1).astype(np.int32),
    "loss_mask": np.concatenate([labels[:, 1:] != -100, np.zeros((len(ids), 1), bool)], axis=1),
  }
  arrays = jax.device_put(arrays, parallel.batch_sharding(mesh))

  def step():
    nonlocal state
    state, metrics = trainer.train_step(state, arrays)
    return jax.block_until_ready(metrics)

  return step


def ours(
  directory: str, shape: dict, stage: str, batch: dict, steps: int, overrides: dict[str, str], slots: int = 1
) -> dict:
  import jax

  on_gpu = jax.default_backend() == "gpu"
  step = our_step(directory, shape, stage, batch, overrides, slots)
  t0 = time.perf_counter()
  first = step()
  first_s = time.perf_counter() - t0
  times = [timed(step) for _ in range(steps)]
  peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) if on_gpu else None
  return {
    "loss": float(first["train/loss"]),
    "times": times,
    "first_s": first_s,
    "peak_device_bytes": peak,
    "device": jax.devices()[0].device_kind if on_gpu else f"cpu ({os.cpu_count()} cores)",
    "matmul_flops": matmul_rate("jax", on_gpu),
  }


def theirs(directory: str, shape: dict, stage: str, batch: dict, steps: int, compile_: bool) -> dict:
  import torch
  import transformers

  on_gpu = torch.cuda.is_available()
  device = "cuda" if on_gpu else "cpu"
  model = (
    transformers.LlavaForConditionalGeneration.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="sdpa"
    )
    .to(device)
    .train()
  )
  for p in model.model.vision_tower.parameters():
    p.requires_grad_(False)
  if stage == "stage1":
    for p in list(model.model.language_model.parameters()) + list(model.lm_head.parameters()):
      p.requires_grad_(False)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=on_gpu)
  ids = torch.from_numpy(batch["ids"]).to(device)
  labels = torch.from_numpy(batch["labels"]).to(device)
  pixels = torch.from_numpy(batch["pixels"].transpose(0, 3, 1, 2).copy()).to(device)

  def train_step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
      out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()

  fn = torch.compile(train_step) if compile_ else train_step

  def step():
    loss = fn()
    if on_gpu:
      torch.cuda.synchronize()
    return loss

  t0 = time.perf_counter()
  loss = float(step())
  first_s = time.perf_counter() - t0
  times = [timed(step) for _ in range(steps)]
  return {
    "loss": loss,
    "times": times,
    "first_s": first_s,
    "peak_device_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
    "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)",
    "matmul_flops": matmul_rate("torch", on_gpu),
  }


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def matmul_rate(framework: str, on_gpu: bool, repeats: int = 20) -> float:
  """FLOP/s of the framework's fastest 4096x768 @ 768x2048 matmul (fp32; bf16 on GPU): a ceiling
  for the step's dense work on this machine."""
  m, k, n = 4096, 768, 2048
  if framework == "jax":
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = min(timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
  else:
    import torch

    dtype = torch.bfloat16 if on_gpu else torch.float32
    device = "cuda" if on_gpu else "cpu"
    a, b = torch.ones((m, k), dtype=dtype, device=device), torch.ones((k, n), dtype=dtype, device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    (a @ b, sync())
    best = min(timed(lambda: (a @ b, sync())) for _ in range(repeats))
  return 2 * m * k * n / best


def worker(args) -> None:
  """One system in this process: prints its raw figures as one JSON line."""
  shape = SHAPES[args.shape]
  batch = dict(np.load(os.path.join(args.dir, "batch.npz")))
  if args.worker == "vlm-jax":
    out = ours(
      args.dir,
      shape,
      args.stage,
      batch,
      args.steps,
      config_levers(args.lever),
      int(levers(args.lever).get("image_slots", 1)),
    )
  else:
    out = theirs(args.dir, shape, args.stage, batch, args.steps, args.compile)
  out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out), flush=True)


WORKLOAD_LEVERS = ("supervise", "image_slots", "xla_flags")  # the rest are config overrides


def levers(pairs: list[str]) -> dict[str, str]:
  out = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"--lever {pair!r}: expected NAME=VALUE")
    out[name] = value
  return out


def config_levers(pairs: list[str]) -> dict[str, str]:
  return {k: v for k, v in levers(pairs).items() if k not in WORKLOAD_LEVERS}


def run_worker(system: str, args, directory: str) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    system,
    "--dir",
    directory,
    "--shape",
    args.shape,
    "--stage",
    args.stage,
    "--steps",
    str(args.steps),
  ] + [f"--lever={p}" for p in args.lever]
  cmd += ["--compile"] if args.compile else []
  env = dict(os.environ)
  xla_flags = levers(args.lever).get("xla_flags")
  if system == "vlm-jax" and xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
  if out.returncode:
    raise SystemExit(f"{system}: worker failed with exit status {out.returncode}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--shape", choices=SHAPES, default="cpu")
  p.add_argument("--stage", choices=("stage1", "stage2"), default="stage2")
  p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
  p.add_argument("--compile", action="store_true", help="torch.compile transformers' step")
  p.add_argument("--lever", action="append", default=[], help="NAME=VALUE (see the module docstring)")
  p.add_argument("--worker", choices=("vlm-jax", "transformers"), help=argparse.SUPPRESS)
  p.add_argument("--dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  shape = SHAPES[args.shape]
  supervise = levers(args.lever).get("supervise", "answer")
  if supervise not in ("answer", "all"):
    raise SystemExit(f"--lever supervise={supervise}: expected answer or all")
  slots = levers(args.lever).get("image_slots", "1")
  if not slots.isdigit() or int(slots) < 1:
    raise SystemExit(f"--lever image_slots={slots}: expected an integer >= 1")
  with tempfile.TemporaryDirectory() as directory:
    write_llava(directory, shape)
    batch = make_batch(shape, supervise)
    np.savez(os.path.join(directory, "batch.npz"), **batch)
    counts = param_counts(directory)
    results = {system: run_worker(system, args, directory) for system in ("vlm-jax", "transformers")}
  flops = model_flops(shape, args.stage, counts)
  losses = {s: r["loss"] for s, r in results.items()}
  on_gpu = results["vlm-jax"]["peak_device_bytes"] is not None
  tolerance = 2e-2 if on_gpu else 1e-4  # bf16 on GPU
  if abs(losses["vlm-jax"] - losses["transformers"]) > tolerance * abs(losses["transformers"]):
    raise SystemExit(f"the systems disagree on the batch's loss: {losses}")
  steps = {}
  for system, r in results.items():
    step_s = statistics.median(r["times"])
    steps[system] = step_s
    tokens = shape["batch"] * shape["seq"]
    print(
      json.dumps(
        {
          "system": system,
          "stage": args.stage,
          "shape": args.shape,
          "device": r["device"],
          "supervise": supervise,
          "image_slots": int(slots) if system == "vlm-jax" else 1,
          "levers": config_levers(args.lever) if system == "vlm-jax" else {},
          "step_s": round(step_s, 3),
          "tokens_per_s": round(tokens / step_s, 1),
          "tflops": round(flops / step_s / 1e12, 4),
          "mfu": round(flops / step_s / GPU_PEAK_FLOPS, 3) if on_gpu else None,
          "ceiling_fraction": round(flops / step_s / r["matmul_flops"], 3),
          "matmul_tflops": round(r["matmul_flops"] / 1e12, 4),
          "peak_mem_bytes": r["peak_device_bytes"] if on_gpu else r["peak_rss_bytes"],
          "compile_s": round(r["first_s"] - step_s, 2),
          "loss": round(r["loss"], 6),
          "compiled": args.compile if system == "transformers" else True,
        }
      ),
      flush=True,
    )
  print(json.dumps({"ratio": round(steps["transformers"] / steps["vlm-jax"], 3)}), flush=True)


if __name__ == "__main__":
  sys.exit(main())
