"""config.lora: LoRA / QLoRA adapters (vlm_jax/models/lora.py, docs/lora.md)."""

import ml_collections

from vlm_jax.config.checks import check_one_of
from vlm_jax.errors import UserError

LORA_BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")


def defaults() -> ml_collections.ConfigDict:
  # LoRA / QLoRA (vlm_jax/models/lora.py, docs/lora.md); rank 0: off. With it on, a
  # component with adapters trains only them; the others train as the stage says.
  return ml_collections.ConfigDict(
    dict(
      rank=0,
      alpha=16.0,
      dropout=0.0,  # on the adapters' input, as PEFT's lora_dropout
      # Comma-separated regexes over module paths: llm/layers/(q|k|v|o|gate|up|down),
      # vision/layers/(q|k|v|o|fc1|fc2), bridge/linear_1, ...
      targets="llm/layers/(q|k|v|o|gate|up|down)",
      base_dtype="float32",  # the adapted kernels' storage: float32 | bfloat16 | int8 | nf4 (QLoRA)
      block_size=64,
    )
  )  # int8 / nf4: input rows per scale (QLoRA's 64); 0: one per output channel


def check_lora(lora: ml_collections.ConfigDict) -> None:
  check_one_of("config.lora.base_dtype", lora.base_dtype, LORA_BASE_DTYPES)
  for name, ok in (
    ("rank", lora.rank >= 0),
    ("alpha", lora.alpha > 0),
    ("dropout", 0 <= lora.dropout < 1),
    ("block_size", lora.block_size >= 0),
  ):
    if not ok:
      raise UserError(f"config.lora.{name}: {lora[name]} is out of range")
