"""Which converter a model takes: a Hugging Face directory's by its config.json model_type, a
workdir's by its config.task. LLaVA's is the default on import (its errors say what it reads)."""

import json
from typing import Callable

import ml_collections

from vlm_jax import build as build_lib
from vlm_jax.convert import contrastive, hf_import
from vlm_jax.files import as_path, read_json
from vlm_jax.train import checkpoint as checkpoint_lib

# HF model_type -> (directory, out, base=) -> out: `vlm-jax convert --from-hf DIR --out OUT`.
IMPORTERS: dict[str, Callable] = {"clip": contrastive.convert, "siglip": contrastive.convert}
# config.task -> (path, run) -> params: config.model.init_from (an HF directory or a workdir).
LOAD_PARAMS: dict[str, Callable] = {"vlm": hf_import.load_params, "contrastive": contrastive.load_params}
# config.task -> (checkpoint, out, **options) -> out: `--checkpoint PATH --to-hf OUT`. The VLM's is
# the CLI's, over vlm_jax.load (a layer above).
EXPORTERS: dict[str, Callable] = {"contrastive": contrastive.export_checkpoint}


def convert(directory: str, out: str, base: ml_collections.ConfigDict | None = None) -> str:
  model_type = read_json(directory).get("model_type")
  return IMPORTERS.get(model_type, hf_import.convert_llava)(directory, out, base=base)


def load_params(path: str, run: build_lib.Run) -> dict:
  return LOAD_PARAMS[run.config.task](path, run)


def checkpoint_task(path: str) -> str:
  """The task of a --checkpoint: its workdir's config.task (an HF LLaVA directory: vlm)."""
  if hf_import.is_hf_dir(path):
    return "vlm"
  workdir, _ = checkpoint_lib.resolve(path)
  return json.loads((as_path(workdir) / "config.json").read_text()).get("task", "vlm")
