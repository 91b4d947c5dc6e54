"""Config defaults, loading of config files, `--config.KEY=VALUE` overrides and validation.

Every config file builds on `base()`, so every run has every field; unknown fields are errors.
Each owner's module gives its fields' defaults and their checks side by side: model (model-wide
fields, fusion), vision, contrastive (and the text tower), anyres, bridge, llm, data, train, lora,
devices (mesh, xla), evals; schema composes them (base, validate), loading reads and writes
configs. `validate` checks the fields themselves and changes nothing; the choices that name a
registry entry (task, bridge kind, vision flavour, activations, remat policy) are checked by the
registries' owners (build.validate).
"""

from vlm_jax.config.checks import check_fields, check_one_of
from vlm_jax.config.data import IMAGE_POSITIONS, RESAMPLE, RESIZE_MODES, check_image_position
from vlm_jax.config.devices import BATCH_AXES, MESH_AXES, TENSOR_AXIS
from vlm_jax.config.evals import complete_evals, eval_entries, eval_entry, eval_name
from vlm_jax.config.llm import ROPE_TYPES
from vlm_jax.config.loading import apply_overrides, flatten, from_json, load_file, to_json
from vlm_jax.config.lora import LORA_BASE_DTYPES, check_lora
from vlm_jax.config.model import COMPONENTS, VLM_COMPONENTS
from vlm_jax.config.schema import STAGES, base, validate
from vlm_jax.config.train import FROZEN_DTYPES

__all__ = [
  "BATCH_AXES",
  "MESH_AXES",
  "TENSOR_AXIS",
  "COMPONENTS",
  "FROZEN_DTYPES",
  "IMAGE_POSITIONS",
  "LORA_BASE_DTYPES",
  "RESAMPLE",
  "RESIZE_MODES",
  "ROPE_TYPES",
  "STAGES",
  "VLM_COMPONENTS",
  "apply_overrides",
  "base",
  "check_fields",
  "check_image_position",
  "check_lora",
  "check_one_of",
  "complete_evals",
  "eval_entries",
  "eval_entry",
  "eval_name",
  "flatten",
  "from_json",
  "load_file",
  "to_json",
  "validate",
]
