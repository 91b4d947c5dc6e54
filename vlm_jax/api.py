"""The Python API: `vlm_jax.load(PATH)`, a trained model ready to answer questions about images,
and `train`, the training loop wired to its eval and to Hugging Face checkpoints."""

import dataclasses
import os
from typing import Iterator, Sequence

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
from vlm_jax.infer.generate import Generator, Sampling, bucket
from vlm_jax.infer.text import TextStream
from vlm_jax.train.checkpoint import read_params, resolve


class Model:
  """Params + tokenizer + config of one checkpoint, on a mesh over all local devices (FSDP)."""

  def __init__(self, config, tokenizer: Tokenizer, run: build_lib.Run, params, step: int, origin=None):
    self.config, self.tokenizer, self.run, self.params, self.step = config, tokenizer, run, params, step
    self.origin = origin  # convert.hf_import.Origin when the model came from Hugging Face
    self.generator = Generator(run.model, run.mesh, pad_id=tokenizer.pad_id, context=config.model.llm.max_len)
    self.anyres = anyres_batch.for_config(config)
    self.preprocessing = images_lib.Preprocessing.from_config(config)

  @property
  def image_tokens(self) -> int:
    """Tokens of one image (AnyRes: of a tile; see image_tokens_for)."""
    return self.run.image_tokens

  def image_tokens_for(self, image) -> int:
    """Tokens the image takes in the prompt: its AnyRes plan's, or the fixed count."""
    return self.anyres.tokens(image) if self.anyres else self.image_tokens

  def encode_prompt(self, prompt: str, raw_prompt: bool = False, image=None,
                    history: Sequence[tuple[str, str]] = ()) -> np.ndarray:
    """Prompt ids (after `history`, earlier (user, answer) rounds); image: one image, a list of
    them (several <image> markers, or that many put in front), or None (the model's one-image
    count). With AnyRes each image decides how many placeholders its <image> becomes."""
    if image is None:
      if self.anyres:
        raise UserError("encode_prompt: an AnyRes model's <image> takes as many tokens as the image's tile "
                        "plan; pass the image")
      counts = self.image_tokens
    else:
      counts = [self.image_tokens_for(im) for im in _image_list(image)]
    return templates.encode_prompt(prompt, self.tokenizer, counts, self.config.data.template, raw=raw_prompt,
                                   image_position=self.config.data.image_position, history=history)

  def preprocess(self, image: "PIL.Image.Image | np.ndarray") -> np.ndarray:
    """[H, W, 3], the model's input for one image (one tile; see AnyRes.prepare for tiling): uint8
    pixels (data.images_uint8: the model normalises them) or float32 normalised."""
    return self.preprocessing(image)

  def pixels(self, images: Sequence) -> "np.ndarray | dict":
    """Each prompt's images (one, a list, or None) -> the model's image input: [B, N, H, W, 3]
    (rows with fewer images padded), or AnyRes's tiles, each image by its own plan."""
    rows = [_image_list(im) for im in images]
    if self.anyres:
      tiled = [[self.anyres.prepare(im) for im in r] for r in rows]
      visual_len = bucket(max(1, max(sum(t.plan.tokens for t in r) for r in tiled)))  # few compiled shapes
      return self.anyres.collate_rows(tiled, visual_len)
    size = self.config.model.vision.image_size
    out = np.zeros((len(rows), max(1, max(len(r) for r in rows)), size, size, 3), self.preprocessing.dtype)
    for i, r in enumerate(rows):
      for j, im in enumerate(r):
        out[i, j] = self.preprocess(im)
    return out

  def generate_ids(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
                   raw_prompt: bool = False, *, history: Sequence[tuple[str, str]] = (),
                   stop_token_ids: Sequence[int] = (), **sampling) -> list[list[int]]:
    """New ids for each (images, prompt), without the stop token; see generate."""
    ids, pixels = self._inputs(images, prompts, raw_prompt, history)
    return self.generator(self.params, ids, pixels, max_new_tokens=max_new_tokens,
                          sampling=_sampling(sampling), stop_ids=self._stop_ids(stop_token_ids))

  def generate(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
               raw_prompt: bool = False, **kwargs) -> list[str]:
    """Answers, one per (images, prompt): greedy by default; temperature, top_k, top_p, min_p,
    repetition_penalty and seed as in infer.generate.Sampling. images[i]: a PIL image or uint8
    HxWx3 array, a list of them, or None. history: earlier (user, answer) rounds (one prompt)."""
    return [self.tokenizer.decode(ids).strip()
            for ids in self.generate_ids(images, prompts, max_new_tokens, raw_prompt, **kwargs)]

  def stream(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
             raw_prompt: bool = False, *, history: Sequence[tuple[str, str]] = (),
             stop_token_ids: Sequence[int] = (), **sampling) -> Iterator[str]:
    """The answer to one prompt as text pieces, each as soon as its tokens are decoded; the pieces
    join to what generate returns."""
    if len(prompts) != 1:
      raise UserError(f"stream: one prompt at a time, got {len(prompts)} (generate takes a batch)")
    ids, pixels = self._inputs(images, prompts, raw_prompt, history)
    text = TextStream(self.tokenizer)
    for pieces in self.generator.stream(self.params, ids, pixels, max_new_tokens=max_new_tokens,
                                        sampling=_sampling(sampling), stop_ids=self._stop_ids(stop_token_ids)):
      piece = text.push(pieces[0])
      if piece:
        yield piece

  def _inputs(self, images: Sequence, prompts: Sequence[str], raw_prompt: bool,
              history: Sequence[tuple[str, str]]) -> tuple[list[np.ndarray], "np.ndarray | dict"]:
    if len(images) != len(prompts):
      raise UserError(f"generate: {len(images)} images for {len(prompts)} prompts; give one entry (an image, "
                      "a list of images or None) per prompt")
    if history and len(prompts) != 1:
      raise UserError("generate: history goes with one prompt")
    ids = [self.encode_prompt(p, raw_prompt, [] if im is None else im, history) for p, im in zip(prompts, images)]
    return ids, self.pixels(images)

  def _stop_ids(self, extra: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({self.tokenizer.eos_id, *extra}))


def _image_list(image) -> list:
  """One image, a list/tuple of images, or None -> a list."""
  if image is None:
    return []
  return list(image) if isinstance(image, (list, tuple)) else [image]


def _sampling(kwargs: dict) -> Sampling:
  unknown = set(kwargs) - {f.name for f in dataclasses.fields(Sampling)}
  if unknown:
    raise UserError(f"generate: unknown argument(s) {', '.join(sorted(unknown))}")
  return Sampling(**kwargs)


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
