"""The Python API: `vlm_jax.load(PATH)`, a trained model ready to answer questions about images,
and `train`, the training loop wired to its eval and to Hugging Face checkpoints."""

import os
from typing import Sequence

import ml_collections
import numpy as np
import PIL.Image

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.convert import hf_import
from vlm_jax.data import anyres_batch
from vlm_jax.data import images as images_lib
from vlm_jax.data import templates
from vlm_jax.data.tokenizer import BUILTIN, Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer.generate import BUCKET, Greedy
from vlm_jax.train.checkpoint import read_params, resolve


class Model:
  """Params + tokenizer + config of one checkpoint, on a mesh over all local devices (FSDP)."""

  def __init__(self, config, tokenizer: Tokenizer, run: build_lib.Run, params, step: int, origin=None):
    self.config, self.tokenizer, self.run, self.params, self.step = config, tokenizer, run, params, step
    self.origin = origin  # convert.hf_import.Origin when the model came from Hugging Face
    self._greedy = Greedy(run.model, run.mesh, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    self.anyres = anyres_batch.for_config(config)
    self.preprocessing = images_lib.Preprocessing.from_config(config)

  @property
  def image_tokens(self) -> int:
    """Tokens of one image (AnyRes: of a tile; see image_tokens_for)."""
    return self.run.image_tokens

  def image_tokens_for(self, image) -> int:
    """Tokens the image takes in the prompt: its AnyRes plan's, or the fixed count."""
    return self.anyres.tokens(image) if self.anyres else self.image_tokens

  def encode_prompt(self, prompt: str, raw_prompt: bool = False, image=None) -> np.ndarray:
    """Prompt ids; with AnyRes the image decides how many placeholders <image> becomes."""
    if self.anyres and image is None:
      raise UserError("encode_prompt: an AnyRes model's <image> takes as many tokens as the image's tile "
                      "plan; pass the image")
    n = self.image_tokens if image is None else self.image_tokens_for(image)
    return templates.encode_prompt(prompt, self.tokenizer, n, self.config.data.template,
                                   raw=raw_prompt, image_position=self.config.data.image_position)

  def preprocess(self, image: "PIL.Image.Image | np.ndarray") -> np.ndarray:
    """float32 [H, W, 3]: the model's input for one image (one tile; see AnyRes.prepare for tiling)."""
    return self.preprocessing(image)

  def generate_ids(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
                   raw_prompt: bool = False) -> list[list[int]]:
    if len(images) != len(prompts):
      raise UserError(f"generate: {len(images)} images for {len(prompts)} prompts; give one image per prompt")
    if max_new_tokens < 1:
      raise UserError("--max-new-tokens must be >= 1")
    ids = [self.encode_prompt(p, raw_prompt, im) for p, im in zip(prompts, images)]
    if self.anyres:  # each image tiled by its own plan, as in training
      tiled = [self.anyres.prepare(im) for im in images]
      visual_len = -(-max(t.plan.tokens for t in tiled) // BUCKET) * BUCKET  # few compiled shapes
      pixels = self.anyres.collate_rows(tiled, visual_len)
    else:
      pixels = np.stack([self.preprocess(im) for im in images])[:, None]
    return self._greedy(self.params, ids, pixels, max_new_tokens)

  def generate(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
               raw_prompt: bool = False) -> list[str]:
    """Greedy answers, one per (image, prompt). Images: PIL images or uint8 HxWx3 arrays."""
    return [self.tokenizer.decode(ids).strip()
            for ids in self.generate_ids(images, prompts, max_new_tokens, raw_prompt)]


def load(path: str, dtype: str | None = None) -> Model:
  """PATH: a workdir (its latest checkpoint), one of its checkpoints/<step> directories, or a
  Hugging Face LLaVA directory (converted on the fly). dtype overrides the compute dtype
  (e.g. "float32" to compare with another implementation)."""
  if hf_import.is_hf_dir(path):
    config, tokenizer, run, params, origin = hf_import.open_llava(path, dtype=dtype)
    return Model(config, tokenizer, run, params, 0, origin)
  workdir, step = resolve(path)
  with open(os.path.join(workdir, "config.json")) as f:
    config = config_lib.from_json(f.read())
  if dtype:
    config.model.dtype = dtype
  tokenizer = Tokenizer.load(_in_workdir(config.data.tokenizer, workdir))
  build_lib.resolve_model_config(config, tokenizer.vocab_size)
  run = build_lib.build(config, parallel.inference_mesh(config), tokenizer.image_id)
  params, step = read_params(workdir, step, run, "--checkpoint")
  return Model(config, tokenizer, run, params, step, hf_import.load_origin(workdir))


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir` (what `vlm-jax train` runs): the periodic eval of
  config.data.eval_sources, and config.model.init_from may be a Hugging Face LLaVA directory.
  Returns the last eval metrics; see vlm_jax.train.loop.train."""
  from vlm_jax.eval import runner  # here: loading a model for inference needs neither
  from vlm_jax.train import loop
  return loop.train(config, workdir, evaluator=runner.periodic_evaluator, load_params=hf_import.load_params,
                    stop_after=stop_after)


def _in_workdir(spec: str, workdir: str) -> str:
  """A relative tokenizer path that exists inside the workdir (a converted model's hf/) is read there."""
  if spec in BUILTIN or os.path.isabs(spec) or not os.path.exists(os.path.join(workdir, spec)):
    return spec
  return os.path.join(workdir, spec)
