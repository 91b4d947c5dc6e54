"""Tiny random Hugging Face models and tokenizers, saved with save_pretrained, for the converter tests."""

import json
import os

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from vlm_jax import cli
from vlm_jax.convert.safetensors_io import read_all

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

WORDS = "USER: ASSISTANT: what color is the circle red blue green a photo of cat on mat square".split()
# Our "simple" template in Jinja, as a model's tokenizer_config.json would carry it.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}"
            "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
BOS, EOS, PAD = 1, 2, 3


def save_tokenizer(directory: str, image: bool = True, template: str | None = TEMPLATE) -> tokenizers.Tokenizer:
  """A word-level tokenizer.json: <unk> <s> </s> <pad>, the words, then <image> (if asked)."""
  os.makedirs(directory, exist_ok=True)
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
  if image:
    tok.add_special_tokens([tokenizers.AddedToken("<image>", special=True, normalized=False)])
  # BOS in front when encoding with special tokens, as Llama tokenizers do.
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "unk_token": "<unk>"}
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
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
  return model.eval()


LLM_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
LLMS = {
    # Llama 3.1-style RoPE scaling, with a short original length so the blend matters at 12 tokens.
    "llama": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-5)),   # QKV bias, tied head
    "mistral": ("MistralConfig", dict(sliding_window=5, head_dim=16)),            # window < sequence
    "gemma": ("GemmaConfig", dict(head_dim=16)),             # (1+w) norms, sqrt(width) scale, tanh GELU
}


def text_config(family: str, vocab: int):
  name, extra = LLMS[family]
  return getattr(transformers, name)(vocab_size=vocab, **LLM_KW, **extra)


def save_llm(directory: str, family: str, vocab: int = 64, seed: int = 0):
  cls = transformers.AutoModelForCausalLM
  model = randomize(cls.from_config(text_config(family, vocab), attn_implementation="eager"), seed)
  model.save_pretrained(directory)
  return model


VISION_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 image_size=16, patch_size=8)


def vision_config(flavour: str):
  cls = transformers.CLIPVisionConfig if flavour == "clip" else transformers.SiglipVisionConfig
  return cls(**VISION_KW)


def save_vision(directory: str, flavour: str, seed: int = 0, full: bool = False):
  """A vision tower alone, or inside a CLIPModel/SiglipModel (full: text tower too, as on the hub)."""
  if full:
    cls, cfg = ((transformers.CLIPModel, transformers.CLIPConfig) if flavour == "clip"
                else (transformers.SiglipModel, transformers.SiglipConfig))
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=40,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = cls(cfg(vision_config=VISION_KW, text_config=text))
  else:
    model = transformers.AutoModel.from_config(vision_config(flavour))
  model = randomize(model, seed)
  model.save_pretrained(directory)
  return model


def save_llava(directory: str, flavour: str = "clip", family: str = "llama", seed: int = 0, **llava_kw):
  """A LlavaForConditionalGeneration with its tokenizer (image token = the last id)."""
  tok = save_tokenizer(directory)
  config = transformers.LlavaConfig(vision_config=vision_config(flavour), text_config=text_config(family, 64),
                                    image_token_id=tok.token_to_id("<image>"), **llava_kw)
  model = randomize(transformers.LlavaForConditionalGeneration(config), seed)
  model.config._attn_implementation = "eager"
  model.save_pretrained(directory)
  return model, tok


NEW_LAYOUT = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower.vision_model."),
              ("multi_modal_projector.", "model.multi_modal_projector."))


def rewrite_keys(directory: str, renames=NEW_LAYOUT, drop: tuple[str, ...] = ()) -> None:
  """Rewrites model.safetensors with renamed key prefixes (another layout) or without some keys."""
  import safetensors.numpy
  tensors = {}
  for key, value in read_all(directory).items():
    if key in drop:
      continue
    for old, new in renames:
      if key.startswith(old):
        key = new + key[len(old):]
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
