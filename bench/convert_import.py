"""Realistic-size Hugging Face import: peak RSS and time of `vlm-jax convert --from-hf`.

Writes a random LLaVA directory the size of Llama-3.2-1B + CLIP ViT-L/14-336 (bf16, sharded
safetensors, a 128k-word tokenizer.json), then converts it (and exports it back) in a child
process under /usr/bin/time and prints one JSON object with the figures.

  python bench/convert_import.py --work /tmp/bench_convert [--keep]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

LLAMA_1B = dict(
  model_type="llama",
  vocab_size=128320,
  hidden_size=2048,
  intermediate_size=8192,
  num_hidden_layers=16,
  num_attention_heads=32,
  num_key_value_heads=8,
  head_dim=64,
  rms_norm_eps=1e-5,
  tie_word_embeddings=True,
  max_position_embeddings=131072,
  bos_token_id=128000,
  eos_token_id=128001,
  rope_parameters=dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
  ),
)
CLIP_L_336 = dict(
  model_type="clip_vision_model",
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=24,
  num_attention_heads=16,
  image_size=336,
  patch_size=14,
  projection_dim=768,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)
WORDS = 128000  # tokenizer words; + <|begin_of_text|>, <|end_of_text|>, <image>


def write_random_llava(directory: str) -> int:
  """Random bf16 weights under the hub's LLaVA keys, from our own key tables. Returns bytes."""
  from vlm_jax import build as build_lib
  from vlm_jax import config as config_lib
  from vlm_jax import parallel
  from vlm_jax.convert import hf_config, layout, params as params_lib
  from vlm_jax.convert.safetensors_io import write_sharded

  hc = dict(
    architectures=["LlavaForConditionalGeneration"],
    model_type="llava",
    text_config=LLAMA_1B,
    vision_config=CLIP_L_336,
    image_token_id=WORDS + 2,
    projector_hidden_act="gelu",
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    dtype="bfloat16",
  )
  info = hf_config.llava_from_hf(hc, "bench")
  config = config_lib.base()
  config.model.vision.update(info["vision"])
  config.model.vision.depth = CLIP_L_336["num_hidden_layers"]  # every block on disk
  config.model.llm.update(info["llm"])
  run = build_lib.build(config, parallel.inference_mesh(), hc["image_token_id"])
  shapes = {k: v.shape for k, v in build_lib.flat_params(run.abstract_params).items()}
  items = params_lib.plan(config.model, layout.LLAVA, shapes, ("vision", "bridge", "llm"))
  rng = np.random.default_rng(0)

  def random(shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  tensors = {}
  for it in items:
    shape = it.transform.hf_shape(it.layer_shape)
    for key in it.keys:
      tensors[key] = (shape, ml_dtypes.bfloat16, lambda shape=shape: random(shape))
  for name in ("weight", "bias"):
    tensors[f"vision_tower.vision_model.post_layernorm.{name}"] = ((1024,), ml_dtypes.bfloat16, lambda: random((1024,)))
  write_sharded(directory, tensors, max_shard_bytes=2 << 30)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hc, f, indent=2)
  _write_tokenizer(directory)
  return sum(int(np.prod(s)) * 2 for s, _, _ in tensors.values())


def _write_tokenizer(directory: str) -> None:
  import tokenizers
  from tokenizers import models, pre_tokenizers

  vocab = {f"w{i}": i for i in range(WORDS)}
  vocab.update({"<|begin_of_text|>": WORDS, "<|end_of_text|>": WORDS + 1})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(
    [
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t in ("<|begin_of_text|>", "<|end_of_text|>", "<image>")
    ]
  )
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(
      {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"},
      f,
    )


def timed(args: list[str]) -> dict:
  """Runs a vlm-jax command in a child under /usr/bin/time -v: wall seconds and peak RSS."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), XLA_FLAGS="")
  cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "vlm_jax.cli", *args]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if result.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
  rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
  seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
  return {"seconds": round(seconds, 1), "peak_rss_gb": round(rss_kb / 2**20, 2)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--work", default="/tmp/bench_convert")
  p.add_argument("--keep", action="store_true", help="keep the files written")
  args = p.parse_args()
  hf_dir, out, back = (os.path.join(args.work, n) for n in ("hf", "ours", "back"))
  for d in (out, back):
    shutil.rmtree(d, ignore_errors=True)
  figures = {}
  if not os.path.isfile(os.path.join(hf_dir, "config.json")):
    os.makedirs(hf_dir, exist_ok=True)
    t0 = time.time()
    figures["hf_bytes"] = write_random_llava(hf_dir)
    figures["write_random_seconds"] = round(time.time() - t0, 1)
  figures["hf_files"] = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  figures["import"] = timed(["convert", "--from-hf", hf_dir, "--out", out])
  figures["export"] = timed(["convert", "--checkpoint", out, "--to-hf", back])
  print(json.dumps(figures))
  if not args.keep:
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
  main()
