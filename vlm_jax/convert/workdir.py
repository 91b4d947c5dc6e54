"""A vlm-jax workdir opened for use (inference, evaluation, export): its config, tokenizer, a run on
an FSDP mesh over the local devices, and its params. vlm_jax/train/checkpoint.py owns the files;
this builds what reads them outside training."""

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.files import as_path
from vlm_jax.train import checkpoint as checkpoint_lib


def open_workdir(path: str, dtype: str | None = None) -> tuple:
  """--checkpoint PATH (a workdir or step directory) for inference or export: (config, tokenizer,
  run, params, step, workdir), params on an FSDP mesh over the local devices; dtype overrides
  the compute dtype."""
  workdir, step = checkpoint_lib.resolve(path)
  config = config_lib.from_json((as_path(workdir) / "config.json").read_text())
  if dtype:
    config.model.dtype = dtype
  tokenizer = Tokenizer.load(checkpoint_lib.in_workdir(config.data.tokenizer, workdir))
  build_lib.resolve_model_config(config, tokenizer.vocab_size, tokenizer.eos_id)
  run = build_lib.build(config, parallel.inference_mesh(), tokenizer.image_id)
  params, step = checkpoint_lib.read_params(workdir, step, run, "--checkpoint")
  return config, tokenizer, run, params, step, workdir
