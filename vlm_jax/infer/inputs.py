"""A model's inputs from text and images: prompt ids (chat template, image placeholders) and the
pixels (one square view per image, or AnyRes tiles), for generation, scoring and evaluation."""

from typing import Sequence

import ml_collections
import numpy as np

from vlm_jax.data import IMAGE, anyres_batch, templates
from vlm_jax.data import images as images_lib
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer.generate import bucket
from vlm_jax.models import vlm


def image_list(image) -> list:
  """One image, a list/tuple of images, or None -> a list."""
  if image is None:
    return []
  return list(image) if isinstance(image, (list, tuple)) else [image]


class Inputs:
  """Prompt ids and pixels for one config and tokenizer."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.image_tokens = vlm.image_tokens(config.model)  # of one image (AnyRes: of a tile)
    self.anyres = anyres_batch.for_config(config, self.image_tokens)
    self.preprocessing = images_lib.Preprocessing.from_config(config)

  def image_tokens_for(self, image) -> int:
    """Tokens the image takes in the prompt: its AnyRes plan's, or the fixed count."""
    return self.anyres.tokens(image) if self.anyres else self.image_tokens

  def encode_prompt(
    self, prompt: str, raw_prompt: bool = False, image=None, history: Sequence[tuple[str, str]] = ()
  ) -> np.ndarray:
    """Prompt ids (after `history`, earlier (user, answer) rounds); image: one image, a list of
    them (several <image> markers, or that many put in front), or None (the model's one-image
    count). With AnyRes each image decides how many placeholders its <image> becomes."""
    return templates.encode_prompt(
      prompt,
      self.tokenizer,
      self._counts(image),
      self.config.data.template,
      raw=raw_prompt,
      image_position=self.config.data.image_position,
      history=history,
    )

  def _counts(self, image) -> "int | list[int]":
    """Placeholders per <image>: each image's count, or without images the model's one count."""
    if image is None:
      if self.anyres:
        raise UserError(
          "encode_prompt: an AnyRes model's <image> takes as many tokens as the image's tile plan; pass the image"
        )
      return self.image_tokens
    return [self.image_tokens_for(im) for im in image_list(image)]

  def encode_answered(self, prompt: str, answer: str, image=None) -> templates.Encoded:
    """The prompt and an answer to it as one round: the ids start with encode_prompt's, and the
    mask marks the answer's tokens (with the template's end-of-turn, as training supervises it)."""
    images = image_list(image)
    if images and IMAGE not in prompt:
      prompt = templates.place_image(prompt, self.config.data.image_position, len(images))
    return templates.encode_conversation(
      [("user", prompt), ("assistant", answer.strip())], self.tokenizer, self._counts(image), self.config.data.template
    )

  def pixels(self, images: Sequence) -> "np.ndarray | dict":
    """Each prompt's images (one, a list, or None) -> the model's image input: [B, N, H, W, 3]
    (rows with fewer images padded), or AnyRes's tiles, each image by its own plan."""
    rows = [image_list(im) for im in images]
    if self.anyres:
      tiled = [[self.anyres.prepare(im) for im in r] for r in rows]
      visual_len = bucket(max(1, max(sum(t.plan.tokens for t in r) for r in tiled)))  # few compiled shapes
      return self.anyres.collate_rows(tiled, visual_len)
    size = self.config.model.vision.image_size
    out = np.zeros((len(rows), max(1, max(len(r) for r in rows)), size, size, 3), self.preprocessing.dtype)
    for i, r in enumerate(rows):
      for j, im in enumerate(r):
        out[i, j] = self.preprocessing(im)
    return out
