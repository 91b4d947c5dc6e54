"""One sample from its source to model-ready arrays: tokens, loss mask and preprocessed images.

Runs in the loader's worker threads or processes (it decodes and resizes images), so it never
raises on a bad sample: it returns Skipped with the reason, and the loader counts it (or, under
data.strict, stops with its message, which names the source and the sample index).
"""

import dataclasses
import io
import sys
from typing import Sequence

import numpy as np
import PIL.Image

from vlm_jax.data import IMAGE, anyres
from vlm_jax.data import images as images_lib
from vlm_jax.data.anyres_batch import AnyRes
from vlm_jax.data.sources import ImageRef, Sample, Source
from vlm_jax.data.templates import encode_conversation
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import BadSample, UserError


@dataclasses.dataclass(frozen=True)
class Prepared:
  """tokens int32 [n], loss_mask bool [n], images [tiles, H, W, 3] in placeholder order (uint8 or
  float32: Preprocessing.dtype);
  with AnyRes, plans: each image's plan (its plan.tiles tiles are consecutive in `images`)."""

  key: str
  tokens: np.ndarray
  loss_mask: np.ndarray
  images: np.ndarray
  plans: tuple[anyres.Plan, ...] = ()

  @property
  def slots(self) -> int:
    """The row image slots it takes: a tile each, or with AnyRes an image each (tiles go to
    the tile group's pool)."""
    return len(self.plans) if self.plans else len(self.images)

  @property
  def tiles(self) -> int:
    """Tiles it puts in its group's pool (AnyRes: its plans'; else one per image, data.image_pool)."""
    return sum(p.tiles for p in self.plans) if self.plans else len(self.images)


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
        return images_lib.to_rgb(image)  # the array Preprocessing and AnyRes start from
    return images_lib.load_image(ref)
  except UserError as e:
    raise BadSample("image", str(e)) from None
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise BadSample("image", f"cannot decode image bytes: {e}") from None


def read_sample(sources: Sequence[Source], item: tuple[int, int], prepare):
  """prepare(sample `index` of source `k`), or Skipped naming the source and index (the loader
  counts it, or stops with the message under data.strict)."""
  k, index = item
  source = sources[k]
  try:
    return prepare(source[index])
  except BadSample as e:
    return Skipped(e.reason, f"{source.name} sample {index}: {e}")


class Prepare:
  """(source number, index) -> Prepared | Skipped. Picklable, for worker processes."""

  def __init__(
    self,
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    *,
    template: str,
    image_tokens: int,
    seq_len: int,
    max_images: int,
    preprocessing: images_lib.Preprocessing,
    anyres: AnyRes | None = None,
    max_tiles: int = sys.maxsize,
  ):
    """Without AnyRes each image is one tile, `preprocessing(image)`, and takes one of the row's
    data.max_images image slots; with AnyRes, `anyres.prepare` tiles each image by its plan."""
    self.sources, self.tokenizer, self.template = list(sources), tokenizer, template
    self.image_tokens, self.seq_len, self.max_images = image_tokens, seq_len, max_images
    self.preprocessing = preprocessing
    self.anyres, self.max_tiles = anyres, max_tiles  # max_tiles: a tile group's pool size (AnyRes, image_pool)

  def __call__(self, item: tuple[int, int]) -> Prepared | Skipped:
    return read_sample(self.sources, item, self.prepare)

  def prepare(self, sample: Sample) -> Prepared:
    """Cheap checks first: a sample that is too long is rejected before its images are decoded."""
    placeholders = sum(text.count(IMAGE) for _, text in sample.turns)
    if placeholders != len(sample.images):
      raise BadSample(
        "image_count", f"id {sample.key}: {len(sample.images)} image(s) but {placeholders} {IMAGE} placeholder(s)"
      )
    # AnyRes: an image's token count follows from its size, so images are decoded first.
    decoded = [decode_image(ref) for ref in sample.images] if self.anyres else None
    plans = tuple(self._plan(sample.key, image) for image in decoded) if self.anyres else ()
    try:
      enc = encode_conversation(
        sample.turns, self.tokenizer, [p.tokens for p in plans] if self.anyres else self.image_tokens, self.template
      )
    except BadSample as e:
      raise BadSample(e.reason, f"id {sample.key}: {e}") from None
    if len(enc.tokens) > self.seq_len:
      raise BadSample("too_long", f"id {sample.key}: {len(enc.tokens)} tokens > seq_len {self.seq_len}")
    if self.anyres:
      tiles = [self.anyres.prepare(image).tiles for image in decoded]
    else:
      tiles = [self.preprocessing(decode_image(ref))[None] for ref in sample.images]
    # No images: an empty stack that fits (broadcasts into) any image size.
    dtype = self.preprocessing.dtype
    stacked = np.concatenate(tiles).astype(dtype) if tiles else np.zeros((0, 1, 1, 3), dtype)
    prepared = Prepared(sample.key, enc.tokens, enc.loss_mask, stacked, plans)
    if prepared.slots > self.max_images:
      raise BadSample(
        "too_many_images",
        f"id {sample.key}: {prepared.slots} "
        f"{'images' if self.anyres else 'image tiles'} > data.max_images {self.max_images}",
      )
    if prepared.tiles > self.max_tiles:
      pool = "config.model.anyres.max_tiles" if self.anyres else "config.data.image_pool"
      raise BadSample(
        "too_many_tiles",
        f"id {sample.key}: {prepared.tiles} tiles > {self.max_tiles}, the tile slots of a group ({pool} / tile groups)",
      )
    return prepared

  def _plan(self, key: str, image) -> anyres.Plan:
    try:
      return self.anyres.plan(image)
    except UserError as e:  # e.g. an elongated image with no tokens (base_view off)
      raise BadSample("image", f"id {key}: {e}") from None
