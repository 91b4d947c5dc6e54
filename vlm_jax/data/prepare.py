"""One sample from its source to model-ready arrays: tokens, loss mask and preprocessed images.

Runs in the loader's worker threads or processes (it decodes and resizes images), so it never
raises on a bad sample: it returns Skipped with the reason, and the loader counts it (or, under
data.strict, stops with its message, which names the source and the sample index).
"""

import dataclasses
import functools
import io
from typing import Callable, Sequence

import numpy as np
import PIL.Image

from vlm_jax.data import images as images_lib
from vlm_jax.data.sources import ImageRef, Sample, Source
from vlm_jax.data.templates import encode_conversation
from vlm_jax.data.tokenizer import IMAGE, Tokenizer
from vlm_jax.errors import BadSample, UserError


@dataclasses.dataclass(frozen=True)
class Prepared:
  """tokens int32 [n], loss_mask bool [n], images float32 [tiles, H, W, 3] in placeholder order."""
  key: str
  tokens: np.ndarray
  loss_mask: np.ndarray
  images: np.ndarray


@dataclasses.dataclass(frozen=True)
class Skipped:
  reason: str
  message: str


def decode_image(ref: ImageRef) -> PIL.Image.Image | np.ndarray:
  """A path, encoded bytes or a uint8 array -> an image; BadSample("image") if unreadable."""
  if isinstance(ref, np.ndarray):
    return ref
  try:
    if isinstance(ref, bytes):
      with PIL.Image.open(io.BytesIO(ref)) as image:
        return image.convert("RGB")
    return images_lib.load_image(ref)
  except UserError as e:
    raise BadSample("image", str(e)) from None
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise BadSample("image", f"cannot decode image bytes: {e}") from None


def _one_tile(image: PIL.Image.Image | np.ndarray, size: int, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  return images_lib.preprocess(image, size, mean, std)[None]


def image_preprocessor(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
  """decoded image -> float32 [tiles, size, size, 3]: the one place image arrays are made.

  One tile (the image resized) here; AnyRes tiling plugs in as another such function. Each
  tile takes one of the row's data.max_images image slots.
  """
  return functools.partial(_one_tile, size=size, mean=mean, std=std)


class Prepare:
  """(source number, index) -> Prepared | Skipped. Picklable, for worker processes."""

  def __init__(self, sources: Sequence[Source], tokenizer: Tokenizer, *, template: str,
               image_tokens: int, seq_len: int, max_images: int, image_fn: Callable):
    self.sources, self.tokenizer, self.template = list(sources), tokenizer, template
    self.image_tokens, self.seq_len, self.max_images = image_tokens, seq_len, max_images
    self.image_fn = image_fn

  def __call__(self, item: tuple[int, int]) -> Prepared | Skipped:
    k, index = item
    source = self.sources[k]
    try:
      return self.prepare(source[index])
    except BadSample as e:
      return Skipped(e.reason, f"{source.name} sample {index}: {e}")

  def prepare(self, sample: Sample) -> Prepared:
    """Cheap checks first: a sample that is too long is rejected before its images are decoded."""
    placeholders = sum(text.count(IMAGE) for _, text in sample.turns)
    if placeholders != len(sample.images):
      raise BadSample("image_count", f"id {sample.key}: {len(sample.images)} image(s) but "
                      f"{placeholders} {IMAGE} placeholder(s)")
    try:
      enc = encode_conversation(sample.turns, self.tokenizer, self.image_tokens, self.template)
    except BadSample as e:
      raise BadSample(e.reason, f"id {sample.key}: {e}") from None
    if len(enc.tokens) > self.seq_len:
      raise BadSample("too_long", f"id {sample.key}: {len(enc.tokens)} tokens > seq_len {self.seq_len}")
    tiles = [self.image_fn(decode_image(ref)) for ref in sample.images]
    # No images: an empty stack that fits (broadcasts into) any image size.
    stacked = np.concatenate(tiles).astype(np.float32) if tiles else np.zeros((0, 1, 1, 3), np.float32)
    if len(stacked) > self.max_images:
      raise BadSample("too_many_images", f"id {sample.key}: {len(stacked)} image tiles > "
                      f"data.max_images {self.max_images}")
    return Prepared(sample.key, enc.tokens, enc.loss_mask, stacked)
