"""The Python API: `vlm_jax.load(PATH)`, a trained model ready to answer questions about images,
and `train`, the training loop wired to its eval and to Hugging Face checkpoints."""

import dataclasses
from typing import Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import PIL.Image

from vlm_jax import build as build_lib
from vlm_jax.convert import dispatch, hf_import, init_from
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer.generate import Generator, Sampling
from vlm_jax.infer.inputs import Inputs
from vlm_jax.infer.score import Scorer
from vlm_jax.infer.text import TextStream
from vlm_jax.train.checkpoint import open_workdir


class Model:
  """Params + tokenizer + config of one checkpoint, on a mesh over all local devices (FSDP)."""

  def __init__(self, config, tokenizer: Tokenizer, run: build_lib.Run, params, step: int, origin=None):
    self.config, self.tokenizer, self.run, self.params, self.step = config, tokenizer, run, params, step
    self.origin = origin  # convert.hf_import.Origin when the model came from Hugging Face
    answers = config.task == "vlm"  # a contrastive model embeds images and text; it answers no prompts
    self.generator = (Generator(run.model, run.mesh, pad_id=tokenizer.pad_id, context=config.model.llm.max_len)
                      if answers else None)
    self.inputs = Inputs(config, tokenizer)
    self.anyres = self.inputs.anyres
    self.scorer = Scorer(run.model, run.mesh, pad_id=tokenizer.pad_id) if answers else None

  @property
  def image_tokens(self) -> int:
    """Tokens of one image (AnyRes: of a tile; see image_tokens_for)."""
    return self.run.image_tokens

  def image_tokens_for(self, image) -> int:
    """Tokens the image takes in the prompt: its AnyRes plan's, or the fixed count."""
    return self.inputs.image_tokens_for(image)

  def encode_prompt(self, prompt: str, raw_prompt: bool = False, image=None,
                    history: Sequence[tuple[str, str]] = ()) -> np.ndarray:
    """Prompt ids; see infer.inputs.Inputs.encode_prompt."""
    return self.inputs.encode_prompt(prompt, raw_prompt, image, history)

  def preprocess(self, image: "PIL.Image.Image | np.ndarray") -> np.ndarray:
    """[H, W, 3], the model's input for one image (one tile; see AnyRes.prepare for tiling): uint8
    pixels (data.images_uint8: the model normalises them) or float32 normalised."""
    return self.inputs.preprocessing(image)

  def pixels(self, images: Sequence) -> "np.ndarray | dict":
    """Each prompt's images (one, a list, or None) -> the model's image input; see
    infer.inputs.Inputs.pixels."""
    return self.inputs.pixels(images)

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

  def loglikelihood(self, images: Sequence, prompts: Sequence[str], continuations: Sequence[str]
                    ) -> list[tuple[float, bool]]:
    """(log p(continuation | images, prompt), whether greedy decoding gives exactly it) for each
    triple. The continuation is scored as the assistant's answer in the chat template, its
    end-of-turn marker included (what multiple-choice harnesses rank options by)."""
    self._answers("loglikelihood")
    if not len(images) == len(prompts) == len(continuations):
      raise UserError(f"loglikelihood: {len(images)} images, {len(prompts)} prompts and {len(continuations)} "
                      "continuations; give one of each per request")
    sequences, masks = [], []
    for im, prompt, continuation in zip(images, prompts, continuations):
      enc = self.inputs.encode_answered(prompt, continuation, [] if im is None else im)  # as _inputs
      if len(enc.tokens) > self.config.model.llm.max_len:
        raise UserError(f"loglikelihood: {len(enc.tokens)} tokens exceed the model's context of "
                        f"{self.config.model.llm.max_len} (config.model.llm.max_len)")
      sequences.append(enc.tokens)
      masks.append(enc.loss_mask)
    return self.scorer(self.params, sequences, masks, self.pixels(images))

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
    self._answers("generate")
    if len(images) != len(prompts):
      raise UserError(f"generate: {len(images)} images for {len(prompts)} prompts; give one entry (an image, "
                      "a list of images or None) per prompt")
    if history and len(prompts) != 1:
      raise UserError("generate: history goes with one prompt")
    ids = [self.encode_prompt(p, raw_prompt, [] if im is None else im, history) for p, im in zip(prompts, images)]
    return ids, self.pixels(images)

  def _answers(self, what: str) -> None:
    if self.generator is None:
      raise UserError(f"{what}: a {self.config.task} model answers no prompts (vlm-jax eval scores it zero-shot)")

  def _stop_ids(self, extra: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({self.tokenizer.eos_id, *extra}))


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
  config, tokenizer, run, params, step, workdir = open_workdir(path, dtype)
  return Model(config, tokenizer, run, params, step, hf_import.load_origin(workdir))


def train(config: ml_collections.ConfigDict, workdir: str, *, explicit: Iterable[str] = (),
          stop_after: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir` (what `vlm-jax train` runs), with the periodic evals
  of config.evals. config.model.init_from (a Hugging Face directory: LLaVA, CLIP, SigLIP, the
  task's; or a workdir) brings the model, tokenizer, chat template and image processor it was made
  with (convert/init_from.py); `explicit`: the fields the caller set on purpose, kept where they
  are choices, refused where they contradict the weights. Returns the last eval metrics; see
  vlm_jax.train.loop.train."""
  from vlm_jax.eval import runner  # here: loading a model for inference needs neither
  from vlm_jax.train import loop
  init_from.take_from_checkpoint(config, explicit)
  return loop.train(config, workdir, evals=runner.periodic_evals, load_params=dispatch.load_params,
                    stop_after=stop_after)
