"""Decoding speed: our generate against transformers' `generate` on the same weights, one run.

Builds one random LLaVA in transformers (fp32), saves it, loads it with vlm_jax.load (our
converter) and runs both greedy with a KV cache, one image per prompt, the same prompt ids and
pixels, no early stop, at batch 1 and 32. Prints one JSON line per system and batch, then the
ratios, and at batch 1 the fraction of the memory-bandwidth limit reached (decoding one row reads
every LLM weight once per token).

  python bench/decode.py --shape cpu|ref [--new-tokens 64] [--batches 1,32] [--repeats 3]

tokens_per_s: new tokens (all rows) per second of decoding after the first token, the rate a
reader sees; time_to_first_token_s: the prompt's prefill (image + text) to the first token;
total_s: both, timed within the same call (medians of --repeats calls). The first call (our
compile, torch's warm-up) is not timed.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
from hf_llava import CPU_SHAPE, write_llava

SHAPES = {
  # CLIP-style ViT 6 x 384 at 224 px / patch 16, Llama 6 x 768 (GQA 12/4), vocab 32000
  "cpu": CPU_SHAPE,
  # LLaVA-1.5-7B: CLIP ViT-L/14-336 and a Llama-2-7B-sized decoder (a GPU shape)
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
      hidden_size=4096,
      intermediate_size=11008,
      num_hidden_layers=32,
      num_attention_heads=32,
      num_key_value_heads=32,
      vocab_size=32064,
    ),
  ),
}
PROMPT = "USER: <image>\nWhat is shown in this picture? Describe it in detail. ASSISTANT:"


class PeakRSS:
  """Peak resident memory above the level at entry, sampled every 5 ms."""

  def __enter__(self):
    self.base = self.peak = _rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()
    return self

  def _watch(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.bytes = self.peak - self.base


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def timed(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(system: str, run, batch: int, new_tokens: int, repeats: int, device: str) -> dict:
  """run(n) -> (seconds to the first new token, seconds in all, ids [batch, n]), both times from
  the same call; medians of `repeats` calls after a warm-up call. Peak memory: above the level
  before this measure (on CPU, resident memory, warm-up and compile included)."""
  with PeakRSS() as mem:
    runs = [run(new_tokens) for _ in range(repeats + 1)]
  for _, _, out in runs:
    assert len(out) == batch and all(len(r) == new_tokens for r in out), f"{system}: expected {batch} x {new_tokens}"
  first = statistics.median(r[0] for r in runs[1:])
  total = statistics.median(r[1] for r in runs[1:])
  decode = statistics.median(r[1] - r[0] for r in runs[1:])
  peak = run.peak_device_bytes() if device == "gpu" else mem.bytes
  return {
    "system": system,
    "batch": batch,
    "new_tokens": new_tokens,
    "device": device,
    "tokens_per_s": round(batch * (new_tokens - 1) / decode, 2),
    "time_to_first_token_s": round(first, 4),
    "total_s": round(total, 4),
    "end_to_end_tokens_per_s": round(batch * new_tokens / total, 2),
    "peak_mem_bytes": int(peak),
  }


def ours(directory: str, prompt: str, images: list):
  import jax
  import vlm_jax

  model = vlm_jax.load(directory, dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
  ids = model.encode_prompt(prompt, raw_prompt=True, image=images[0])
  pixels_one = model.pixels([images[0]])

  def runner(batch: int):
    pixels = np.repeat(pixels_one, batch, axis=0)

    def run(n: int):  # no stop token: every row decodes n tokens; the first yield is the prefill's token
      t0 = time.perf_counter()
      chunks = model.generator.stream(model.params, [ids] * batch, pixels, max_new_tokens=n, stop_ids=(), every=n)
      rows = next(chunks)
      first = time.perf_counter() - t0
      for more in chunks:
        rows = [r + m for r, m in zip(rows, more)]
      return first, time.perf_counter() - t0, rows

    run.peak_device_bytes = lambda: jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)
    return run

  return model, ids, pixels_one, runner


def theirs(directory: str, ids: np.ndarray, pixels_one: np.ndarray, on_gpu: bool):
  import torch
  import transformers

  device = "cuda" if on_gpu else "cpu"
  dtype = torch.bfloat16 if on_gpu else torch.float32
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device).eval()
  hf.generation_config.eos_token_id = None  # no early stop, as ours

  class FirstToken(transformers.generation.streamers.BaseStreamer):
    """Notes when generate hands over its first new tokens (its first put is the prompt)."""

    def __init__(self):
      self.puts, self.at = 0, None

    def put(self, value):
      self.puts += 1
      if self.puts == 2:
        if on_gpu:
          torch.cuda.synchronize()
        self.at = time.perf_counter()

    def end(self):
      pass

  pixels_nchw = torch.from_numpy(pixels_one[:, 0].transpose(0, 3, 1, 2).copy())

  def runner(batch: int):
    input_ids = torch.from_numpy(np.asarray([ids] * batch, np.int64)).to(device)
    pixels = pixels_nchw.repeat(batch, 1, 1, 1).to(device, dtype)

    def run(n: int):
      streamer = FirstToken()
      t0 = time.perf_counter()
      with torch.inference_mode():
        out = hf.generate(
          input_ids=input_ids,
          attention_mask=torch.ones_like(input_ids),
          pixel_values=pixels,
          max_new_tokens=n,
          min_new_tokens=n,
          do_sample=False,
          pad_token_id=3,
          streamer=streamer,
        )
      if on_gpu:
        torch.cuda.synchronize()
      return streamer.at - t0, time.perf_counter() - t0, out[:, input_ids.shape[1] :].tolist()

    run.peak_device_bytes = lambda: torch.cuda.max_memory_allocated()
    return run

  return hf, runner


def matvec_bandwidth(n: int = 8192, repeats: int = 50) -> float:
  """Bytes/s of an fp32 n x n matrix-vector product in JAX, at its fastest of `repeats` (a
  ceiling): the rate a batch-1 decode can read weights."""
  import jax
  import jax.numpy as jnp

  w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda w, x: w @ x)
  f(w, x).block_until_ready()
  seconds = min(timed(lambda: f(w, x).block_until_ready(), 1) for _ in range(repeats))
  return n * n * 4 / seconds


def llm_weight_bytes(model) -> int:
  """LLM weights read per decoded token: every layer and the output head (not the embedding table
  unless it is the head)."""
  import jax

  llm = model.params["llm"]
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(llm["layers"]))
  total += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(llm["final_norm"]))
  head = llm["lm_head"] if "lm_head" in llm else llm["embedder"]["embedding"]
  return total + head.size * head.dtype.itemsize


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--shape", choices=SHAPES, default="cpu")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--batches", default="1,32")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import jax
  import PIL.Image

  on_gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0].device_kind if on_gpu else f"cpu ({os.cpu_count()} cores)"
  batches = [int(b) for b in args.batches.split(",")]
  rng = np.random.default_rng(0)
  image = PIL.Image.fromarray(rng.integers(0, 256, (300, 400, 3), np.uint8))  # not square
  with tempfile.TemporaryDirectory() as directory:
    write_llava(directory, SHAPES[args.shape], tuple(PROMPT.replace("<image>", "").split()))
    model, ids, pixels_one, our_runner = ours(directory, PROMPT, [image])
    hf, their_runner = theirs(directory, ids, pixels_one, on_gpu)
  results = {}
  for batch in batches:
    for system, runner in (("vlm-jax", our_runner), ("transformers", their_runner)):
      r = measure(system, runner(batch), batch, args.new_tokens, args.repeats, "gpu" if on_gpu else "cpu")
      r.update(shape=args.shape, device_name=device, prompt_tokens=len(ids))
      results[system, batch] = r
      print(json.dumps(r), flush=True)
  summary = {
    f"ratio_batch{b}": round(results["vlm-jax", b]["tokens_per_s"] / results["transformers", b]["tokens_per_s"], 2)
    for b in batches
  }
  if 1 in batches:
    weight_bytes = llm_weight_bytes(model)
    bandwidth = matvec_bandwidth()
    summary.update(
      weight_bytes_per_token=weight_bytes,
      matvec_bandwidth_gb_s=round(bandwidth / 1e9, 1),
      bandwidth_fraction_batch1=round(results["vlm-jax", 1]["tokens_per_s"] * weight_bytes / bandwidth, 3),
    )
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  sys.exit(main())
