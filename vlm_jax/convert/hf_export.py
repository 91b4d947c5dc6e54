"""vlm-jax -> Hugging Face: a LlavaForConditionalGeneration directory that transformers loads as is.

config.json, sharded safetensors (+ index), tokenizer files, chat template, generation and
preprocessor configs. A model that came from HF is written back in its own key layout and
dtypes, with the tensors we kept but did not run, so HF -> ours -> HF is bit-identical. A model
trained here gets the hub's LLaVA layout; its vision tower is written with exactly the blocks we
run (vision_feature_layer -1) and an identity post_layernorm, which LLaVA never reads.
"""

import functools
import json
import os
import re
import shutil
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from vlm_jax.build import Run, flat_params
from vlm_jax.convert import hf_config, image_processor, layout as layout_lib, params as params_lib, peft_export
from vlm_jax.convert.hf_import import Origin, components, copy_aux_files, slots
from vlm_jax.convert.safetensors_io import Reader, Tensor, write_sharded
from vlm_jax.data import IMAGE, hf_tokenizer
from vlm_jax.errors import UserError
from vlm_jax.files import check_empty_dir, read_json
from vlm_jax.models import lora
from vlm_jax.train import optim

DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
HF_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

# Our "simple" template as Jinja (matches templates.TEMPLATES["simple"]): the processor adds BOS.
SIMPLE_TEMPLATE = (
  "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}"
  "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def scratch_origin(config, tokenizer) -> Origin:
  """For a model trained here: the hub's layout, the tower exactly as deep as we run it."""
  return Origin(
    None,
    None,
    dict(layout_lib.LLAVA),
    hf_config.infer_llm_family(config.model.llm),
    config.model.vision.depth,
    tokenizer.image_id,
  )


def _vision_layers(origin: Origin, depth: int) -> int:
  """Blocks to declare: ours plus the kept ones after them (contiguous), e.g. CLIP's last."""
  kept = set()
  pattern = re.compile(re.escape(origin.layout["vision"]) + r"encoder\.layers\.(\d+)\.")
  for key in origin.extra_keys:
    m = pattern.match(key)
    if m:
      kept.add(int(m.group(1)))
  n = depth
  while n in kept:
    n += 1
  return n


def _identity_post_norm(origin: Origin, width: int, dtype_of) -> dict[str, Tensor]:
  """HF's towers always have post_layernorm; LLaVA never applies it."""
  out = {}
  for name, fill in (("weight", np.ones), ("bias", np.zeros)):
    key = f"{origin.layout['vision']}post_layernorm.{name}"
    if key not in origin.extra_keys:
      out[key] = ((width,), dtype_of(key), lambda fill=fill: fill((width,), np.float32))
  return out


def write_tokenizer(tokenizer, config, out: str) -> None:
  """Tokenizer files for a model without an HF origin."""
  if isinstance(tokenizer, hf_tokenizer.HFTokenizer):
    src = tokenizer.name if os.path.isdir(tokenizer.name) else os.path.dirname(tokenizer.name)
    for name in hf_tokenizer.FILES:
      if os.path.isfile(os.path.join(src, name)):
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    tokenizer.save(out)
    return
  # Our sentencepiece tokenizer: transformers' LlamaTokenizer reads the .model as it is.
  from vlm_jax.data.tokenizer import BUILTIN

  shutil.copyfile(BUILTIN.get(config.data.tokenizer, config.data.tokenizer), os.path.join(out, "tokenizer.model"))
  piece = tokenizer.id_to_piece
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "pad_token": piece(tokenizer.pad_id),
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": False,
        "extra_special_tokens": {"image_token": IMAGE},
      },
      f,
      indent=2,
    )
  if config.data.template == "simple":
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
      f.write(SIMPLE_TEMPLATE)


def plain_model(run: Run, params, merge_lora: bool, peft: bool) -> tuple:
  """(config, params, peft) to export a checkpoint: a LoRA model's adapters merged into its
  weights (merge_lora) or kept aside for a PEFT adapter (peft: the base weights alone)."""
  lora_cfg = run.config.lora
  if not lora.enabled(lora_cfg):
    if merge_lora or peft:
      raise UserError(f"{'--merge-lora' if merge_lora else '--peft'}: the checkpoint has no LoRA adapters")
    return run.config, params, None
  if not (merge_lora or peft):
    raise UserError(
      "--checkpoint: its model has LoRA adapters (config.lora); give --merge-lora (one merged "
      "model) or --peft (the base model and a PEFT adapter)"
    )
  merge = jax.jit(
    functools.partial(lora.merge, lora_cfg=lora_cfg, with_adapters=merge_lora), out_shardings=run.plain.param_shardings
  )
  return run.plain.config, merge(params), (lora_cfg, params) if peft else None


def check_out(out: str, dtype: str | None = None) -> None:
  """Fails before any loading when the output cannot be written."""
  check_empty_dir(out, "--to-hf")
  if dtype is not None and dtype not in DTYPE_NAMES:
    raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")


def export(
  config,
  tokenizer,
  params,
  origin: Origin | None,
  out: str,
  dtype: str | None = None,
  max_shard_bytes: int = 4 << 30,
  peft: tuple | None = None,
) -> str:
  """Writes the model as a HF LLaVA directory; dtype: float32 | bfloat16 | float16, or None for
  each tensor's dtype at import (float32 for tensors that had none). params: the plain model's
  (lora.merge); peft: (config.lora, the LoRA model's params) adds their adapters as a PEFT
  adapter in out/adapter."""
  check_out(out, dtype)
  origin = origin or scratch_origin(config, tokenizer)
  default, dtype_of = tensor_dtypes(origin.dtypes, dtype)

  model = config.model
  vision_layers = _vision_layers(origin, model.vision.depth)
  hc = hf_config.llava_to_hf(
    model,
    image_token_id=tokenizer.image_id,
    llm_family=origin.llm_family,
    vision_layers=vision_layers,
    has_vision_head=origin.has_vision_head,
    base=origin.hf_config,
  )
  hc.pop("torch_dtype", None)
  hc["dtype"] = HF_DTYPE[default]
  for key, value in (
    ("bos_token_id", tokenizer.bos_id),
    ("eos_token_id", tokenizer.eos_id),
    ("pad_token_id", tokenizer.pad_id),
  ):
    hc["text_config"].setdefault(key, value)  # an HF config's own (e.g. several EOS ids) win

  shapes = {k: v.shape for k, v in flat_params(params).items()}
  # A model that gained AnyRes after import (e.g. from LLaVA-1.5) writes image_newline at the top.
  items = params_lib.plan(model, {"image_newline": "", **origin.layout}, shapes, components(model))
  tensors = params_lib.hf_tensors(items, flat_params(params), dtype_of)
  reader = Reader(origin.extras_dir) if origin.extra_keys else None
  for key in origin.extra_keys:
    tensors[key] = (reader.shape(key), dtype_of(key), lambda key=key: reader.get(key))
  tensors.update(_identity_post_norm(origin, model.vision.width, dtype_of))

  os.makedirs(out, exist_ok=True)
  write_sharded(out, tensors, max_shard_bytes)
  if reader:
    reader.close()
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hc, f, indent=2)
  if origin.files_dir:
    copy_aux_files(origin.files_dir, out)
  else:
    write_tokenizer(tokenizer, config, out)
  if not os.path.isfile(os.path.join(out, "generation_config.json")):
    write_json(
      out,
      "generation_config.json",
      {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id},
    )
  write_processor(config, out)
  if peft:
    peft_export.write(*peft, items, os.path.join(out, peft_export.ADAPTER_DIR), out)
  return out


def trained_whole(run: Run) -> set[str]:
  """Paths of the plain params a LoRA run trained whole (not through adapters): the stage's
  components without adapters, e.g. the bridge in stage 2."""
  labels = flat_params(optim.param_labels(run.abstract_params, run.config.train, run.config.stage))
  return {p for p, label in labels.items() if label != optim.FROZEN and not lora.is_adapter(p)}


def export_adapter(config, params, peft: tuple, base_dir: str, out: str, trained: set[str]) -> str:
  """--peft of a LoRA run that started from a Hugging Face directory: out holds a PEFT adapter for
  that very checkpoint (PeftModel.from_pretrained(its model, out)), the params trained whole (see
  trained_whole) in it as PEFT's modules_to_save, and the tokenizer and image processor the run
  used. params: the plain model's (lora.merge without adapters); peft: (config.lora, the LoRA params)."""
  check_out(out)
  with Reader(base_dir) as reader:
    layout = layout_lib.detect(reader.keys(), slots(config.model), base_dir)
  flat = flat_params(params)
  items = params_lib.plan(config.model, layout, {k: v.shape for k, v in flat.items()}, components(config.model))
  saved = params_lib.hf_tensors([it for it in items if it.path in trained], flat, lambda key: np.dtype(np.float32))
  peft_export.write(*peft, items, out, base_dir, saved)
  copy_aux_files(base_dir, out)
  write_processor(config, out)
  return out


def tensor_dtypes(dtypes: dict[str, str], dtype: str | None) -> tuple[str, Callable[[str], np.dtype]]:
  """(the config's dtype name, HF key -> numpy dtype): --dtype for all, else each key's at import
  (dtypes), the most common of them for a key that had none."""
  default = DTYPE_NAMES[dtype] if dtype else _dominant(dtypes)
  return default, lambda key: DTYPES[DTYPE_NAMES[dtype] if dtype else dtypes.get(key, default)]


def write_json(out: str, name: str, data: dict) -> None:
  with open(os.path.join(out, name), "w") as f:
    json.dump(data, f, indent=2)


def write_processor(config, out: str) -> None:
  """The image processor as config.data says, in the file the checkpoint had it in (transformers
  5.x: processor_config.json's "image_processor"; before: preprocessor_config.json), its other
  fields kept; a model without one gets preprocessor_config.json and the LlavaProcessor (or, with
  AnyRes, LlavaNextProcessor) settings that AutoProcessor needs to expand <image>."""
  found, name = image_processor.find(out)
  if name == "processor_config.json":
    processor = read_json(out, name)
    processor["image_processor"] = image_processor.to_hf(config, found)
    write_json(out, name, processor)
    return
  write_json(out, "preprocessor_config.json", image_processor.to_hf(config, found))
  if not os.path.isfile(os.path.join(out, "processor_config.json")):
    write_json(out, "processor_config.json", _processor(config))


def _processor(config) -> dict:
  """LlavaProcessor / LlavaNextProcessor settings that expand <image> to our count (CLIP: +1 CLS,
  then the "default" strategy drops it again)."""
  v = config.model.vision
  clip = v.flavour == "clip"
  return {
    "processor_class": "LlavaNextProcessor" if config.model.anyres.enabled else "LlavaProcessor",
    "image_token": IMAGE,
    "patch_size": v.patch_size,
    "vision_feature_select_strategy": "default" if clip else "full",
    "num_additional_image_tokens": int(clip),
  }


def _dominant(dtypes: dict[str, str]) -> str:
  """The dtype most tensors had (bf16 for most hub checkpoints); float32 if none is known."""
  if not dtypes:
    return "F32"
  names = list(dtypes.values())
  return max(set(names), key=names.count)
