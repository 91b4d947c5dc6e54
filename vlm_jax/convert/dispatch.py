"""Which converter a model takes: a Hugging Face directory's by its config.json model_type, a
workdir's by its config.task. LLaVA's is the default on import (its errors say what it reads).
`import_hf` and `export` are `vlm-jax convert` in each direction, for any model."""

import json
from typing import Callable

import ml_collections

from vlm_jax import build as build_lib
from vlm_jax.convert import contrastive, hf_export, hf_import
from vlm_jax.convert import workdir as workdir_lib
from vlm_jax.errors import UserError
from vlm_jax.files import as_path, read_json
from vlm_jax.train import checkpoint as checkpoint_lib


# HF model_type -> (directory, out, base=) -> out: `vlm-jax convert --from-hf DIR --out OUT`.
IMPORTERS: dict[str, Callable] = {"clip": contrastive.convert, "siglip": contrastive.convert}
# config.task -> (path, run) -> params: config.model.init_from (an HF directory or a workdir).
LOAD_PARAMS: dict[str, Callable] = {"vlm": hf_import.load_params, "contrastive": contrastive.load_params}
# config.task -> (checkpoint, out, **options) -> out: `--checkpoint PATH --to-hf OUT` (others: the VLM's).
EXPORTERS: dict[str, Callable] = {"contrastive": contrastive.export_checkpoint}


def convert(directory: str, out: str, base: ml_collections.ConfigDict | None = None) -> str:
  model_type = read_json(directory).get("model_type")
  return IMPORTERS.get(model_type, hf_import.convert_llava)(directory, out, base=base)


def import_hf(
  directory: str,
  out: str,
  *,
  vision: str | None = None,
  qformer: str | None = None,
  feature_layer: int = -2,
  base: ml_collections.ConfigDict | None = None,
) -> str:
  """`vlm-jax convert --from-hf DIR --out OUT`: a LLaVA, CLIP or SigLIP directory converted (by its
  model_type); with `vision`, DIR an LLM's, a fresh VLM assembled from the two (hf_import.assemble,
  its bridge `qformer`'s Q-Former or random). base: the config whose non-model fields OUT gets."""
  if qformer and not vision:
    raise UserError("convert: --qformer needs --vision (the tower whose features the Q-Former reads)")
  for flag, path in (("--from-hf", directory), ("--vision", vision), ("--qformer", qformer)):
    if path is not None and not as_path(path).is_dir():
      raise UserError(f"{flag}: no such directory: {path}")
  if vision:
    return hf_import.assemble(directory, vision, out, feature_layer=feature_layer, base=base, qformer_dir=qformer)
  return convert(directory, out, base=base)


def export(
  path: str,
  out: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 4 << 30,
  merge_lora: bool = False,
  peft: bool = False,
) -> str:
  """`vlm-jax convert --checkpoint PATH --to-hf OUT` of any checkpoint, by its task; the output
  is checked before anything loads."""
  hf_export.check_out(out, dtype)
  exporter = EXPORTERS.get(checkpoint_task(path), _export_vlm)
  return exporter(path, out, dtype=dtype, max_shard_bytes=max_shard_bytes, merge_lora=merge_lora, peft=peft)


def _export_vlm(
  path: str,
  out: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 4 << 30,
  merge_lora: bool = False,
  peft: bool = False,
) -> str:
  """A VLM checkpoint (or LLaVA directory) as a HF LLaVA directory; a LoRA run that started from
  a Hugging Face directory, with peft: a PEFT adapter for that directory."""
  config, tokenizer, run, params, _, origin = open_checkpoint(path)
  plain, params, adapters = hf_export.plain_model(run, params, merge_lora, peft)
  source = config.model.init_from
  if adapters and hf_import.is_hf_dir(source):  # an adapter for the checkpoint the run started from
    return hf_export.export_adapter(plain, params, adapters, source, out, hf_export.trained_whole(run))
  return hf_export.export(
    plain, tokenizer, params, origin, out, dtype=dtype, max_shard_bytes=max_shard_bytes, peft=adapters
  )


def open_checkpoint(path: str, dtype: str | None = None) -> tuple:
  """A workdir (its latest checkpoint), one of its step directories, or a Hugging Face LLaVA
  directory, loaded for use: (config, tokenizer, run, params, step, origin); see api.load."""
  if hf_import.is_hf_dir(path):
    config, tokenizer, run, params, origin = hf_import.open_llava(path, dtype=dtype)
    return config, tokenizer, run, params, 0, origin
  config, tokenizer, run, params, step, workdir = workdir_lib.open_workdir(path, dtype)
  return config, tokenizer, run, params, step, hf_import.load_origin(workdir)


def load_params(path: str, run: build_lib.Run) -> dict:
  return LOAD_PARAMS[run.config.task](path, run)


def checkpoint_task(path: str) -> str:
  """The task of a --checkpoint: its workdir's config.task (an HF LLaVA directory: vlm)."""
  if hf_import.is_hf_dir(path):
    return "vlm"
  workdir, _ = checkpoint_lib.resolve(path)
  return json.loads((as_path(workdir) / "config.json").read_text()).get("task", "vlm")
