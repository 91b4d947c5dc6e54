"""LoRA adapters -> a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained` loads on transformers' LlavaForConditionalGeneration.

Our adapter of a kernel [*in, *out] is a [in, rank], b [rank, out] (in and out flattened
row-major, as the key tables flatten the kernel into nn.Linear's [out, in]); PEFT's is
lora_A.weight [rank, in] = a.T and lora_B.weight [out, rank] = b.T, with the same
scaling lora_alpha / r.
"""

import json
import os

import ml_collections
import numpy as np

from vlm_jax.convert import params as params_lib, safetensors_io
from vlm_jax.errors import UserError
from vlm_jax.files import is_remote
from vlm_jax.models import lora

ADAPTER_DIR = "adapter"  # inside the --to-hf directory, beside the base model
# Checkpoint key prefixes (the hub's LLaVA layout, or transformers 5's) -> transformers 5's module
# names, which PEFT's adapter keys name (its vision towers no longer nest a `vision_model`).
MODULE_PREFIXES = (
  ("language_model.model.", "model.language_model."),
  ("language_model.lm_head", "lm_head"),
  ("vision_tower.vision_model.", "model.vision_tower."),
  ("model.vision_tower.vision_model.", "model.vision_tower."),
  ("vision_tower.", "model.vision_tower."),
  ("multi_modal_projector.", "model.multi_modal_projector."),
)


def module_name(key: str) -> str:
  """The module a checkpoint key's tensor belongs to, by transformers 5's names:
  "language_model.model.layers.0.self_attn.q_proj.weight" -> "model.language_model.layers.0.self_attn.q_proj"
  (the first matching prefix)."""
  name = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
  for old, new in MODULE_PREFIXES:
    if name.startswith(old):
      return new + name[len(old) :]
  return name


def write(
  lora_cfg: ml_collections.ConfigDict,
  params: dict,
  items: list[params_lib.Item],
  directory: str,
  base_model: str,
  saved: dict[str, safetensors_io.Tensor] | None = None,
) -> str:
  """Writes a PEFT adapter into `directory` (new) for the adapters in params (the LoRA model's,
  host or device arrays) on the model at `base_model`; items: the plain model's export plan (which
  HF tensor each kernel becomes). saved: {checkpoint key: tensor} of modules the run trained whole
  beside the adapters, written as PEFT's modules_to_save."""
  by_path = {it.path: it for it in items}
  tensors, targets = {}, []
  for module, (a, b) in sorted(lora.adapters(params).items()):
    it = by_path.get(f"{module}/kernel")
    if it is None or not it.transform.name.startswith("linear"):
      raise UserError(
        f"--peft: {module} is not a Linear layer in transformers' LLaVA, so PEFT cannot adapt it; "
        "export with --merge-lora"
      )
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    for layer, key in enumerate(it.keys):
      name = module_name(key)
      la, lb = (a[layer], b[layer]) if it.stacked else (a, b)
      for suffix, x in (("lora_A", la.T), ("lora_B", lb.T)):
        tensors[f"base_model.model.{name}.{suffix}.weight"] = (x.shape, np.float32, lambda x=x: x)
      targets.append(name)
  modules_to_save = []
  for key, tensor in sorted((saved or {}).items()):
    if not key.endswith((".weight", ".bias")):
      raise UserError(
        f"--peft: {key} was trained and is a bare parameter, not a module PEFT can save "
        "(modules_to_save); export with --merge-lora"
      )
    name = module_name(key)
    tensors[f"base_model.model.{name}.{key.rsplit('.', 1)[1]}"] = tensor
    modules_to_save += [name] if name not in modules_to_save else []
  os.makedirs(directory, exist_ok=True)
  [written] = safetensors_io.write_sharded(directory, tensors, max_shard_bytes=1 << 62)
  os.replace(os.path.join(directory, written), os.path.join(directory, "adapter_model.safetensors"))
  config = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": base_model if is_remote(base_model) else os.path.abspath(base_model),
    "r": lora_cfg.rank,
    "lora_alpha": lora_cfg.alpha,
    "lora_dropout": lora_cfg.dropout,
    "target_modules": targets,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "inference_mode": True,
    "modules_to_save": modules_to_save or None,
  }
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return directory
