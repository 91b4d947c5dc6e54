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
from vlm_jax.models import lora

ADAPTER_DIR = "adapter"  # inside the --to-hf directory, beside the base model
# Checkpoint key prefixes (the hub's LLaVA layout, or transformers 5's) -> transformers 5's module
# names, which PEFT's adapter keys name (its vision towers no longer nest a `vision_model`).
MODULE_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                   ("vision_tower.vision_model.", "model.vision_tower."),
                   ("model.vision_tower.vision_model.", "model.vision_tower."),
                   ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def module_name(weight_key: str) -> str:
  """"language_model.model.layers.0.self_attn.q_proj.weight" -> "model.language_model.layers.0.self_attn.q_proj"
  (the first matching prefix)."""
  name = weight_key.removesuffix(".weight")
  for old, new in MODULE_PREFIXES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def write(lora_cfg: ml_collections.ConfigDict, params: dict, items: list[params_lib.Item], out: str,
          base_dir: str) -> str:
  """Writes out/adapter for the adapters in params (the LoRA model's, host or device arrays);
  items: the plain model's export plan (which HF tensor each kernel becomes)."""
  by_path = {it.path: it for it in items}
  tensors, targets = {}, []
  for module, (a, b) in sorted(lora.adapters(params).items()):
    it = by_path.get(f"{module}/kernel")
    if it is None or not it.transform.name.startswith("linear"):
      raise UserError(f"--peft: {module} is not a Linear layer in transformers' LLaVA, so PEFT cannot adapt it; "
                      "export with --merge-lora")
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    for layer, key in enumerate(it.keys):
      name = module_name(key)
      la, lb = (a[layer], b[layer]) if it.stacked else (a, b)
      for suffix, x in (("lora_A", la.T), ("lora_B", lb.T)):
        tensors[f"base_model.model.{name}.{suffix}.weight"] = (x.shape, np.float32, lambda x=x: x)
      targets.append(name)
  directory = os.path.join(out, ADAPTER_DIR)
  os.makedirs(directory)
  [written] = safetensors_io.write_sharded(directory, tensors, max_shard_bytes=1 << 62)
  os.replace(os.path.join(directory, written), os.path.join(directory, "adapter_model.safetensors"))
  config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": os.path.abspath(base_dir),
            "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "inference_mode": True, "modules_to_save": None}
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return directory
