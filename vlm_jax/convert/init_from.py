"""config.model.init_from is the source of truth for what the weights compute.

The checkpoint a run starts from (a Hugging Face directory or a vlm-jax workdir) brings its model
section, its tokenizer (with its <image> id), its chat template and its image processor, as
transformers' from_pretrained does; a config names only training choices. A config file's model
fields describe the architecture for training from scratch: with an init_from they give way to the
checkpoint's (the log lists each). A field set on purpose (`--config.KEY=VALUE`) is kept where it
is a choice (the template, the image processing, the compute dtype, a longer context) and refused,
in one line, where the weights define it.
"""

import logging
import os
from typing import Callable, Iterable

import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.convert import contrastive, hf_import
from vlm_jax.data.chat_template import HF
from vlm_jax.data.templates import get_template
from vlm_jax.errors import UserError
from vlm_jax.files import as_path, is_remote
from vlm_jax.train import checkpoint as checkpoint_lib

log = logging.getLogger("vlm_jax")

# What the weights compute with: taken from the checkpoint; a different explicit value is refused.
WEIGHT_FIELDS = (
  "model.vision.",
  "model.bridge.",
  "model.llm.",
  "model.text.",
  "model.contrastive.",
  "model.cross_attention.",
  "model.fusion",
  "model.anyres.enabled",
  "data.tokenizer",
)
# Inside those groups, choices of the run (the checkpoint does not define them).
RUN_CHOICES = ("model.vision.token_merging", "model.vision.init_from")
# The checkpoint's, unless set on purpose: how it was prompted and fed, the compute dtype, and
# llm.max_len (a longer context over the checkpoint's RoPE is a training choice).
DEFAULT_FIELDS = (
  "data.template",
  "data.image_resize",
  "data.image_short_side",
  "data.image_fill",
  "data.image_resample",
  "data.image_mean",
  "data.image_std",
  "model.dtype",
  "model.llm.max_len",
  "model.anyres.grid_pinpoints",
  "model.anyres.base_view",
  "model.anyres.max_n",
)

# config.task -> Hugging Face directory -> (config, tokenizer, config.json): the config it describes.
HF_CONFIGS: dict[str, Callable] = {"vlm": hf_import.llava_config, "contrastive": contrastive.read_config}


def weight_field(key: str) -> bool:
  return key.startswith(WEIGHT_FIELDS) and key not in RUN_CHOICES and key not in DEFAULT_FIELDS


def checkpoint_config(path: str, task: str) -> ml_collections.ConfigDict:
  """The config the checkpoint at `path` was made with: an HF directory's as import reads it, a
  workdir's (or step directory's) config.json with its tokenizer path made absolute."""
  if hf_import.is_hf_dir(path):
    config, tokenizer, _ = HF_CONFIGS[task](path)
    config.data.tokenizer = path if tokenizer is not None else None  # None: it has none; the config's stays
    if config.model.dtype == "float16":  # TPUs compute in bfloat16; fp16 without loss scaling underflows
      config.model.dtype = "bfloat16"
    return config
  try:
    workdir, _ = checkpoint_lib.resolve(path)
  except UserError as e:  # resolve speaks of --checkpoint
    raise UserError(f"config.model.init_from: {str(e).removeprefix('--checkpoint: ')}") from None
  config = config_lib.from_json((as_path(workdir) / "config.json").read_text())
  config.data.tokenizer = checkpoint_lib.in_workdir(config.data.tokenizer, workdir)
  return config


def _owned(key: str, config: ml_collections.ConfigDict, value) -> bool:
  """Whether the checkpoint's `value` of `key` replaces the config's. The chat template is the
  checkpoint's when it has its own (template "hf"), and a caption format (stage 1's plain) is the
  run's, never a chat template to replace."""
  if key == "data.template":
    return value == HF and config.data.template != HF and not get_template(config.data.template).captions
  return weight_field(key) or key in DEFAULT_FIELDS


def _same(key: str, a, b) -> bool:
  if key == "data.tokenizer" and not (is_remote(a) or is_remote(b)) and os.path.exists(a) and os.path.exists(b):
    return os.path.samefile(a, b)
  return a == b


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def take_from_checkpoint(config: ml_collections.ConfigDict, explicit: Iterable[str] = ()) -> list[str]:
  """Fills `config` (in place) with what config.model.init_from's checkpoint defines; `explicit`:
  the fields the user set on purpose (`--config.KEY=VALUE`). Returns "field: config -> checkpoint"
  for each value taken; a weight-defining explicit field that differs is one UserError line."""
  path = config.model.init_from
  if not path:
    return []
  if config.task not in HF_CONFIGS:
    raise UserError(f"config.task: {config.task!r} cannot start from a checkpoint (config.model.init_from)")
  explicit = set(explicit)
  theirs = config_lib.flatten(checkpoint_config(path, config.task).to_dict())
  mine = config_lib.flatten(config.to_dict())
  taken = []
  for key, value in sorted(theirs.items()):
    if value is None or not _owned(key, config, value) or _same(key, mine.get(key), value):
      continue
    if key in explicit:
      if weight_field(key):
        raise UserError(
          f"--config.{key}={mine.get(key)!r}: config.model.init_from {path} defines it as {value!r} "
          "(its weights were trained so); leave the field out"
        )
      continue
    _set(config, key, tuple(value) if isinstance(value, list) else value)
    taken.append(f"{key}: {mine.get(key)!r} -> {value!r}")
  if taken:
    log.info("from %s (config.model.init_from):\n  %s", path, "\n  ".join(taken))
  return taken
