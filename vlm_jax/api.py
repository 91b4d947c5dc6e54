"""The Python API: `vlm_jax.load(PATH)`, a trained model ready to answer questions about images;
`train`, the training loop wired to its eval and to Hugging Face checkpoints; `evaluate`, a model
scored on a data spec; `image_token_report`, what an image costs in a config's sequence."""

import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import PIL.Image

from vlm_jax import build as build_lib
from vlm_jax.convert import dispatch, init_from
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer.generate import Generator, Sampling
from vlm_jax.infer.inputs import Inputs
from vlm_jax.infer.score import Scorer
from vlm_jax.infer.text import TextStream

if TYPE_CHECKING:  # evaluate imports it when called: loading a model for inference needs no eval code
  from vlm_jax.eval.runner import Result


class Model:
  """Params + tokenizer + config of one checkpoint, on a mesh over all local devices (FSDP)."""

  def __init__(
    self, config, tokenizer: Tokenizer, run: build_lib.Run, params, step: int, origin=None, path: str | None = None
  ):
    self.config, self.tokenizer, self.run, self.params, self.step = config, tokenizer, run, params, step
    self.origin = origin  # convert.hf_import.Origin when the model came from Hugging Face
    self.path = path  # what it was loaded from (errors name it)
    answers = config.task == "vlm"  # a contrastive model embeds images and text; it answers no prompts
    self.generator = (
      Generator(run.model, run.mesh, pad_id=tokenizer.pad_id, context=config.model.llm.max_len) if answers else None
    )
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

  def encode_prompt(
    self, prompt: str, raw_prompt: bool = False, image=None, history: Sequence[tuple[str, str]] = ()
  ) -> np.ndarray:
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

  def generate_ids(
    self,
    images: Sequence,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    raw_prompt: bool = False,
    *,
    history: Sequence[tuple[str, str]] = (),
    stop_token_ids: Sequence[int] = (),
    **sampling,
  ) -> list[list[int]]:
    """New ids for each (images, prompt), without the stop token; see generate."""
    ids, pixels = self._inputs(images, prompts, raw_prompt, history)
    return self.generator(
      self.params,
      ids,
      pixels,
      max_new_tokens=max_new_tokens,
      sampling=_sampling(sampling),
      stop_ids=self._stop_ids(stop_token_ids),
    )

  def generate(
    self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32, raw_prompt: bool = False, **kwargs
  ) -> list[str]:
    """Answers, one per (images, prompt): greedy by default; temperature, top_k, top_p, min_p,
    repetition_penalty and seed as in infer.generate.Sampling. images[i]: a PIL image or uint8
    HxWx3 array, a list of them, or None. history: earlier (user, answer) rounds (one prompt)."""
    return [
      self.tokenizer.decode(ids).strip()
      for ids in self.generate_ids(images, prompts, max_new_tokens, raw_prompt, **kwargs)
    ]

  def loglikelihood(
    self, images: Sequence, prompts: Sequence[str], continuations: Sequence[str]
  ) -> list[tuple[float, bool]]:
    """(log p(continuation | images, prompt), whether greedy decoding gives exactly it) for each
    triple. The continuation is scored as the assistant's answer in the chat template, its
    end-of-turn marker included (what multiple-choice harnesses rank options by)."""
    self._answers("loglikelihood")
    if not len(images) == len(prompts) == len(continuations):
      raise UserError(
        f"loglikelihood: {len(images)} images, {len(prompts)} prompts and {len(continuations)} "
        "continuations; give one of each per request"
      )
    sequences, masks = [], []
    for im, prompt, continuation in zip(images, prompts, continuations):
      enc = self.inputs.encode_answered(prompt, continuation, [] if im is None else im)  # as _inputs
      if len(enc.tokens) > self.config.model.llm.max_len:
        raise UserError(
          f"loglikelihood: {len(enc.tokens)} tokens exceed the model's context of "
          f"{self.config.model.llm.max_len} (config.model.llm.max_len)"
        )
      sequences.append(enc.tokens)
      masks.append(enc.loss_mask)
    return self.scorer(self.params, sequences, masks, self.pixels(images))

  def stream(
    self,
    images: Sequence,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    raw_prompt: bool = False,
    *,
    history: Sequence[tuple[str, str]] = (),
    stop_token_ids: Sequence[int] = (),
    **sampling,
  ) -> Iterator[str]:
    """The answer to one prompt as text pieces, each as soon as its tokens are decoded; the pieces
    join to what generate returns."""
    if len(prompts) != 1:
      raise UserError(f"stream: one prompt at a time, got {len(prompts)} (generate takes a batch)")
    ids, pixels = self._inputs(images, prompts, raw_prompt, history)
    text = TextStream(self.tokenizer)
    for pieces in self.generator.stream(
      self.params,
      ids,
      pixels,
      max_new_tokens=max_new_tokens,
      sampling=_sampling(sampling),
      stop_ids=self._stop_ids(stop_token_ids),
    ):
      piece = text.push(pieces[0])
      if piece:
        yield piece

  def _inputs(
    self, images: Sequence, prompts: Sequence[str], raw_prompt: bool, history: Sequence[tuple[str, str]]
  ) -> tuple[list[np.ndarray], "np.ndarray | dict"]:
    self._answers("generate")
    if len(images) != len(prompts):
      raise UserError(
        f"generate: {len(images)} images for {len(prompts)} prompts; give one entry (an image, "
        "a list of images or None) per prompt"
      )
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
  return Model(*dispatch.open_checkpoint(path, dtype), path=path)


def train(
  config: ml_collections.ConfigDict, workdir: str, *, explicit: Iterable[str] = (), stop_after: int | None = None
) -> dict:
  """Trains (or resumes) the run in `workdir` (what `vlm-jax train` runs), with the periodic evals
  of config.evals. config.model.init_from (a Hugging Face directory: LLaVA, CLIP, SigLIP, the
  task's; or a workdir) brings the model, tokenizer, chat template and image processor it was made
  with (convert/init_from.py); `explicit`: the fields the caller set on purpose, kept where they
  are choices, refused where they contradict the weights. Returns the last eval metrics; see
  vlm_jax.train.loop.train."""
  from vlm_jax.eval import runner  # here: loading a model for inference needs neither
  from vlm_jax.train import loop

  init_from.take_from_checkpoint(config, explicit)
  return loop.train(
    config, workdir, evals=runner.periodic_evals, load_params=dispatch.load_params, stop_after=stop_after
  )


def scores_zeroshot(model: Model, metric: str = "auto") -> bool:
  """Whether `evaluate` scores the model zero-shot (eval/zeroshot.py): a contrastive model is
  scored only so, and only it is; a mismatch of model and metric is one UserError line."""
  from vlm_jax.eval import zeroshot

  if model.config.task != "contrastive" and metric != zeroshot.METRIC:
    return False
  if model.config.task != "contrastive" or metric not in ("auto", zeroshot.METRIC):
    raise UserError(
      f"--metric {metric}: zero-shot classification scores contrastive models, and a "
      f"contrastive model only that way ({model.path} holds a {model.config.task} model)"
    )
  return True


def evaluate(
  model: Model,
  data: str,
  *,
  metric: str = "auto",
  max_examples: int | None = None,
  batch_size: int | None = None,
  max_new_tokens: int | None = None,
  shuffle_images: bool = False,
  progress: Callable[[int, int], None] | None = None,
  on_metric: Callable[[str, str], None] | None = None,
) -> "Result":
  """The model scored on a data spec (what `vlm-jax eval` runs): its answers by `metric` (auto:
  the one the samples call for; on_metric(metric, why) hears the choice before scoring), or a
  contrastive model's zero-shot classification (512 examples unless max_examples says). Returns
  eval.runner.Result: metrics and each example's record (none zero-shot). batch_size: default
  config.train.eval_batch_size; max_new_tokens: the metric's; shuffle_images: each prompt with
  another example's image (a control); progress(done, total) after each batch."""
  from vlm_jax.eval import runner, zeroshot

  if scores_zeroshot(model, metric):
    for flag, value in (("--shuffle-images", shuffle_images), ("--max-new-tokens", max_new_tokens)):
      if value:
        raise UserError(f"{flag}: not for zero-shot classification")
    scorer = zeroshot.ZeroShot(
      model.run, model.tokenizer, data, max_examples=max_examples or 512, batch_size=batch_size or 0
    )
    return runner.Result(scorer(model.params), [])
  evaluator = runner.Evaluator(
    model.run,
    model.tokenizer,
    data,
    metric=metric,
    max_examples=max_examples,
    batch_size=batch_size or 0,
    max_new_tokens=max_new_tokens or 0,
  )
  if metric == "auto" and on_metric:
    on_metric(evaluator.metric, evaluator.metric_reason)
  return evaluator(model.params, shuffle_images=shuffle_images, progress=progress)


def image_token_report(config: ml_collections.ConfigDict, size: tuple[int, int]) -> tuple[dict, str]:
  """What one image of `size` (height, width) takes in the config's sequence: ({height, width,
  grid, tiles, image_tokens, tile_tokens}, a one-line description with the bridge, ToMe and AnyRes
  plan behind it); what `vlm-jax tokens` prints."""
  from vlm_jax.data import anyres, anyres_batch
  from vlm_jax.models import vit, vlm

  m = config.model
  per_view = vlm.image_tokens(m)  # one tile's, or one view's, in the LLM's sequence
  bridge = f"bridge {m.bridge.kind}: {vlm.visual_tokens(m)} tokens a {'tile' if m.anyres.enabled else 'view'}"
  if m.vision.token_merging:
    unmerged = m.vision.copy_and_resolve_references()
    unmerged.token_merging = 0
    bridge += (
      f" (ToMe, {m.vision.token_merging} merged a ViT block: {vit.num_output_tokens(unmerged)} -> "
      f"{vit.num_output_tokens(m.vision)})"
    )
  if m.fusion == "cross_attention":
    bridge += ", read by cross-attention; the sequence holds 1 <image> marker an image"
  if m.anyres.enabled:
    plan = anyres.plan(size, anyres_batch.spec_from_config(m, per_view))
    out = {
      "height": size[0],
      "width": size[1],
      "grid": list(plan.grid),
      "tiles": plan.tiles,
      "image_tokens": plan.tokens,
      "tile_tokens": per_view,
    }
    detail = [
      bridge,
      f"canvas {plan.canvas[0]}x{plan.canvas[1]}",
      f"resized {plan.resized[0]}x{plan.resized[1]}",
      f"features {plan.features[0]}x{plan.features[1]} (+1 newline a row)",
    ]
  else:  # one square view, whatever the image
    # tile_tokens: the bridge's tokens of the view (cross-attention reads them; its sequence holds 1)
    out = {
      "height": size[0],
      "width": size[1],
      "grid": [1, 1],
      "tiles": 1,
      "image_tokens": per_view,
      "tile_tokens": vlm.visual_tokens(m),
    }
    detail = [bridge, "AnyRes off: resized to one square view"]
  line = (
    f"{size[0]}x{size[1]} (HxW): grid {out['grid'][0]}x{out['grid'][1]}, {out['tiles']} tiles, "
    f"{out['image_tokens']} image tokens; " + ", ".join(detail)
  )
  return out, line
