"""A random Hugging Face LLaVA written to a directory: the model both sides of a side-by-side
benchmark load (transformers directly, ours through the converter)."""

import json
import os

# CLIP-style ViT 6 x 384 at 224 px / patch 16, Llama 6 x 768 (GQA 12/4), vocab 32000: the CPU shape
CPU_SHAPE = dict(
  vision=dict(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=16
  ),
  text=dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=6,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
  ),
)


def write_llava(directory: str, shape: dict, words: tuple[str, ...] = ()) -> None:
  """A random LlavaForConditionalGeneration (std 0.02 init) and a word-level tokenizer whose
  vocabulary holds `words`, then w0, w1, ... and <image> as the last id."""
  import tokenizers
  import torch
  import transformers
  from tokenizers import models, pre_tokenizers, processors

  vocab = shape["text"]["vocab_size"]
  words = ["<unk>", "<s>", "</s>", "<pad>"] + list(words)
  words += [f"w{i}" for i in range(vocab - len(words) - 1)] + ["<image>"]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizers.AddedToken("<image>", special=True, normalized=False)])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
      },
      f,
    )
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**shape["vision"]),
    text_config=transformers.LlamaConfig(**shape["text"], bos_token_id=1, eos_token_id=2, pad_token_id=3),
    image_token_id=vocab - 1,
  )
  transformers.LlavaForConditionalGeneration(config).save_pretrained(directory)
