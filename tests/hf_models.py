"""Tiny random Hugging Face models and tokenizers, saved with save_pretrained, for the converter tests."""

import json
import os

import numpy as np
import PIL.Image
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vlm_jax import cli
from vlm_jax.convert.safetensors_io import read_all

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

WORDS = "USER: ASSISTANT: what color is the circle red blue green a photo of cat on mat square".split()
# Our "simple" template in Jinja, as a model's tokenizer_config.json would carry it.
TEMPLATE = (
  "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}"
  "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
BOS, EOS, PAD = 1, 2, 3


def save_tokenizer(directory: str, image: bool = True, template: str | None = TEMPLATE) -> tokenizers.Tokenizer:
  """A word-level tokenizer.json: <unk> <s> </s> <pad>, the words, then <image> (if asked)."""
  os.makedirs(directory, exist_ok=True)
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(
    [" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
  )
  if image:
    tok.add_special_tokens([tokenizers.AddedToken("<image>", special=True, normalized=False)])
  # BOS in front when encoding with special tokens, as Llama tokenizers do.
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
  }
  if template:
    config["chat_template"] = template
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return tok


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Weights that make every path matter: O(1) activations (HF's std-0.02 init leaves logits
  near zero, where a wrong map can hide under the tolerance), non-trivial norms and biases."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 0.0 if ("norm" in name and "gemma" in type(model).__name__.lower()) else 1.0
        p.copy_((base if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      elif "embed" in name and "patch" not in name or "class_embedding" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
  return model.eval()


LLM_KW = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  bos_token_id=BOS,
  eos_token_id=EOS,
  pad_token_id=PAD,
)
LLMS = {
  # Llama 3.1-style RoPE scaling, with a short original length so the blend matters at 12 tokens.
  "llama": (
    "LlamaConfig",
    dict(
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      )
    ),
  ),
  "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-5)),  # QKV bias, tied head
  "mistral": ("MistralConfig", dict(sliding_window=5, head_dim=16)),  # window < sequence
  "gemma": ("GemmaConfig", dict(head_dim=16)),  # (1+w) norms, sqrt(width) scale, tanh GELU
}


def text_config(family: str, vocab: int):
  name, extra = LLMS[family]
  return getattr(transformers, name)(vocab_size=vocab, **LLM_KW, **extra)


def save_llm(directory: str, family: str, vocab: int = 64, seed: int = 0):
  cls = transformers.AutoModelForCausalLM
  model = randomize(cls.from_config(text_config(family, vocab), attn_implementation="eager"), seed)
  model.save_pretrained(directory)
  return model


VISION_KW = dict(
  hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=8
)


def vision_config(flavour: str):
  cls = transformers.CLIPVisionConfig if flavour == "clip" else transformers.SiglipVisionConfig
  return cls(**VISION_KW)


def save_vision(directory: str, flavour: str, seed: int = 0, full: bool = False):
  """A vision tower alone, or inside a CLIPModel/SiglipModel (full: text tower too, as on the hub)."""
  if full:
    cls, cfg = (
      (transformers.CLIPModel, transformers.CLIPConfig)
      if flavour == "clip"
      else (transformers.SiglipModel, transformers.SiglipConfig)
    )
    text = dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      vocab_size=40,
      bos_token_id=0,
      eos_token_id=1,
      pad_token_id=1,
    )
    model = cls(cfg(vision_config=VISION_KW, text_config=text))
  else:
    model = transformers.AutoModel.from_config(vision_config(flavour))
  model = randomize(model, seed)
  model.save_pretrained(directory)
  return model


def save_llava(directory: str, flavour: str = "clip", family: str = "llama", seed: int = 0, **llava_kw):
  """A LlavaForConditionalGeneration with its tokenizer (image token = the last id)."""
  tok = save_tokenizer(directory)
  config = transformers.LlavaConfig(
    vision_config=vision_config(flavour),
    text_config=text_config(family, 64),
    image_token_id=tok.token_to_id("<image>"),
    **llava_kw,
  )
  model = randomize(transformers.LlavaForConditionalGeneration(config), seed)
  model.config._attn_implementation = "eager"
  model.save_pretrained(directory)
  return model, tok


# --- LLaVA checkpoints as transformers writes them (model, processor, tokenizer, chat template) ---
QUESTION = "what color is the circle"
NEW_TOKENS = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# llava-1.5-hf's chat template: typed content, images first.
CHAT = (
  "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
  "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
  "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
  "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
  "{{ 'ASSISTANT:' }}{% endif %}"
)
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's, at a 32-px tile

# kind -> (vision flavour, vision_feature_select_strategy, image processor); 16-px CLIP/SigLIP
# towers of 8-px patches, 32-px tiles for AnyRes. Each kind has its own LLM family (FAMILY).
KINDS = {
  # llava-1.5-hf: shortest edge then a centre crop (here the short side goes to 20, the crop to 16)
  "clip_crop": (
    "clip",
    "default",
    lambda: CLIPImageProcessorPil(
      size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    ),
  ),
  # SigLIP: squash to the square
  "siglip": ("siglip", "full", lambda: SiglipImageProcessorPil(size={"height": 16, "width": 16})),
  # The original LLaVA-1.5 recipe: pad to a square with the mean colour, then resize and crop
  "llava_pad": (
    "clip",
    "default",
    lambda: LlavaImageProcessorPil(
      do_pad=True,
      size={"shortest_edge": 16},
      crop_size={"height": 16, "width": 16},
      image_mean=CLIP_MEAN,
      image_std=CLIP_STD,
    ),
  ),
  # LLaVA-NeXT AnyRes tiles
  "next": (
    "clip",
    "default",
    lambda: LlavaNextImageProcessorPil(
      size={"shortest_edge": 32},
      crop_size={"height": 32, "width": 32},
      image_grid_pinpoints=TINY_PINPOINTS,
      image_mean=CLIP_MEAN,
      image_std=CLIP_STD,
    ),
  ),
}
# LLaVA CLIP+Llama, SigLIP+Qwen2, a padded LLaVA over Gemma, LLaVA-NeXT over Mistral with a
# 5-token window (far shorter than its sequences).
FAMILY = {"clip_crop": "llama", "siglip": "qwen2", "llava_pad": "gemma", "next": "mistral"}


def image(size, seed=0) -> PIL.Image.Image:
  """Smooth colour gradients plus noise: resampling and cropping differences show."""
  h, w = size
  rng = np.random.default_rng([seed, h, w])
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], -1)
  return PIL.Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def save_llava_tokenizer(directory: str, bos: str = "added") -> None:
  """save_tokenizer's word-level tokenizer; bos: "added" (its post-processor adds BOS, as Llama's),
  "not_added" (BOS defined, never added), "none" (no BOS at all, as Qwen2's)."""
  tok = save_tokenizer(directory, template=None)
  if bos != "added":
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok.save(os.path.join(directory, "tokenizer.json"))
  if bos == "none":
    edit_json(os.path.join(directory, "tokenizer_config.json"), bos_token=None)


def write_llava(directory: str, kind: str, bos: str = "added", chat: str = CHAT, seed: int = 0):
  """A tiny random LLaVA(-NeXT) saved by transformers: model, then processor (which rewrites the
  tokenizer files and writes processor_config.json and the chat template)."""
  flavour, strategy, image_processor = KINDS[kind]
  save_llava_tokenizer(directory, bos)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  vision = vision_config(flavour)
  text = text_config(FAMILY[kind], 64)
  if kind == "next":
    vision.image_size = 32
    config = transformers.LlavaNextConfig(
      vision_config=vision, text_config=text, image_token_id=image_id, image_grid_pinpoints=TINY_PINPOINTS
    )
    model = transformers.LlavaNextForConditionalGeneration(config)
    processor_cls = transformers.LlavaNextProcessor
  else:
    config = transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_select_strategy=strategy
    )
    model = transformers.LlavaForConditionalGeneration(config)
    processor_cls = transformers.LlavaProcessor
  model = randomize(model, seed)
  model.config._attn_implementation = "eager"
  model.save_pretrained(directory)
  processor = processor_cls(
    image_processor=image_processor(),
    tokenizer=tokenizer,
    patch_size=8,
    vision_feature_select_strategy=strategy,
    num_additional_image_tokens=int(flavour == "clip"),
    chat_template=chat,
  )
  processor.save_pretrained(directory)
  return model


def hf_inputs(processor, image: PIL.Image.Image, prompt: str | None = None, raw: bool = False):
  """As a transformers user: the chat template renders the prompt, the processor tokenizes it
  (without a second BOS if the template wrote one) and preprocesses the image."""
  if raw:
    return processor(images=[image], text=[prompt], return_tensors="pt")
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or QUESTION}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  bos = processor.tokenizer.bos_token
  return processor(
    images=[image], text=[text], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))
  )


def hf_greedy(model, inputs, **kwargs) -> list[int]:
  """32 new tokens, cut at EOS as ours are (ours drop it)."""
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD, **kwargs)
  new = out[0, inputs["input_ids"].shape[1] :].tolist()
  return new[: new.index(EOS)] if EOS in new else new


NEW_LAYOUT = (
  ("language_model.model.", "model.language_model."),
  ("language_model.lm_head.", "lm_head."),
  ("vision_tower.", "model.vision_tower.vision_model."),
  ("multi_modal_projector.", "model.multi_modal_projector."),
)


def rewrite_keys(directory: str, renames=NEW_LAYOUT, drop: tuple[str, ...] = ()) -> None:
  """Rewrites model.safetensors with renamed key prefixes (another layout) or without some keys."""
  import safetensors.numpy

  tensors = {}
  for key, value in read_all(directory).items():
    if key in drop:
      continue
    for old, new in renames:
      if key.startswith(old):
        key = new + key[len(old) :]
        break
    tensors[key] = value
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def edit_json(path: str, **changes) -> None:
  with open(path) as f:
    data = json.load(f)
  for key, value in changes.items():
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with open(path, "w") as f:
    json.dump(data, f)


def convert_error(capsys, *args: str) -> str:
  """`vlm-jax convert ARGS` fails with exit status 2 and one error line (returned), no traceback."""
  capsys.readouterr()
  assert cli.main(["convert", *args]) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("vlm-jax: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]
