"""Data-loader speed on LLaVA-like data: samples/s per CPU core, with and without packing.

Writes a LLaVA-format set (640x480 JPEGs, multi-turn conversations of ~200 text tokens), then
reads batches through the real pipeline in this process with one reader thread and no prefetch
thread (decoding, resizing to the model's 336 px, tokenizing and packing) and prints one JSON
object: samples per CPU-second (per core), wall-clock samples/s and batches/s, packing
efficiency (non-padding tokens / all tokens), the image bytes a batch sends to the device and
the images the ViT encodes per batch (real images / every slot or the pool), for each mode:
unpacked, packed (images as float32 normalised on the host), packed with uint8 images (the
default, data.images_uint8), and packed with uint8 images in a pool (data.image_pool).

  python bench/data_loader.py --work /tmp/bench_data [--samples 300] [--batches 20]
"""

import argparse
import json
import os
import time

import numpy as np

from vlm_jax import config as config_lib
from vlm_jax.data import llava_fixture
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.pipeline import Batches
from vlm_jax.data.tokenizer import Tokenizer

IMAGE_SIZE, IMAGE_TOKENS, SEQ_LEN, ROWS = 336, 576, 2048, 8  # CLIP ViT-L/14-336, LLaVA-1.5 length


def write_set(directory: str, samples: int, rounds: int) -> str:
  """The fixture's shapes conversations, repeated to `rounds` rounds (~50 text tokens per 4)."""
  path = llava_fixture.write(directory, samples, image_size=64, jpeg_size=(640, 480), broken=False)
  with open(path) as f:
    records = json.load(f)
  for r in records:
    first, rest = r["conversations"][:2], r["conversations"][2:]
    more = [dict(t, value=t["value"].replace("<image>\n", "")) for t in r["conversations"]]
    r["conversations"] = (first + rest + more * (rounds // 4))[: 2 * rounds]
  with open(path, "w") as f:
    json.dump(records, f)
  return path


MODES = {  # name: (pack, uint8 images, image_pool)
  "unpacked": (False, True, 0),
  "packed_float32": (True, False, 0),
  "packed": (True, True, 0),
  f"packed_pool{3 * ROWS}": (True, True, 3 * ROWS),
}


def measure(path: str, pack: bool, uint8: bool, pool: int, batches: int) -> dict:
  tok = Tokenizer.load("shapes")
  config = config_lib.base()
  config.train.batch_size = ROWS
  config.data.update(
    dict(
      sources=f"llava:{path}",
      seq_len=SEQ_LEN,
      pack=pack,
      max_images=8 if pack else 1,
      threads=1,
      prefetch=0,
      image_pool=pool,
    )
  )
  it = Batches(config, tok, IMAGE_TOKENS, preprocessing=Preprocessing(IMAGE_SIZE, on_device=uint8))
  next(it)  # warm-up: file list, first reads
  t0, cpu0 = time.perf_counter(), time.process_time()
  samples = used = real_images = encoded = image_bytes = 0
  for _ in range(batches):
    b = next(it)
    samples += sum(len(row) for row in b["keys"])
    used += int((b["segment_ids"] > 0).sum())
    images = b["images"]["pool"] if pool else b["images"]
    real_images += int((b["tokens"] == tok.image_id).sum()) // IMAGE_TOKENS
    encoded += images.shape[0] * images.shape[1]
    image_bytes += images.nbytes
  seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
  it.close()
  # Per core: samples per CPU-second of this process (wall-clock rates depend on what else runs).
  return {
    "samples_per_s_per_core": round(samples / cpu_seconds, 1),
    "samples_per_s": round(samples / seconds, 1),
    "batches_per_s": round(batches / seconds, 2),
    "samples_per_row": round(samples / (batches * ROWS), 2),
    "packing_efficiency": round(used / (batches * ROWS * SEQ_LEN), 3),
    "image_mb_per_batch": round(image_bytes / batches / 2**20, 1),
    "vit_images_per_batch": {"real": round(real_images / batches, 1), "encoded": encoded // batches},
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--work", default="/tmp/bench_data")
  p.add_argument("--samples", type=int, default=300)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--rounds", type=int, default=28)
  args = p.parse_args()
  os.makedirs(args.work, exist_ok=True)
  path = write_set(args.work, args.samples, args.rounds)
  tok = Tokenizer.load("shapes")
  with open(path) as f:
    records = json.load(f)
  text_tokens = [sum(len(tok.encode(t["value"])) for t in r["conversations"]) for r in records]
  out = {
    "image": "640x480 JPEG -> 336x336",
    "image_tokens": IMAGE_TOKENS,
    "seq_len": SEQ_LEN,
    "rows": ROWS,
    "text_tokens_mean": round(float(np.mean(text_tokens)), 1),
    "cpu_count": os.cpu_count(),
  }
  for name, (pack, uint8, pool) in MODES.items():
    out[name] = measure(path, pack, uint8, pool, args.batches)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
