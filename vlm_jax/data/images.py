"""Image loading and the model's input normalisation."""

import os
from typing import Sequence

import numpy as np
import PIL.Image

from vlm_jax.errors import UserError


def load_image(path: str) -> PIL.Image.Image:
  """An RGB image from a file; UserError naming the file if it is missing or unreadable."""
  if not os.path.isfile(path):
    raise UserError(f"image file not found: {path}")
  try:
    with PIL.Image.open(path) as image:
      return image.convert("RGB")  # convert() also forces the lazy decode inside `with`.
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise UserError(f"cannot read image {path}: {e}") from None


def preprocess(image: PIL.Image.Image | np.ndarray, size: int,
               mean: Sequence[float] = (0.5, 0.5, 0.5),
               std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
  """float32 [size, size, 3]: RGB, bicubic resize if needed, scaled to [0, 1], normalised.

  Arrays are uint8 HxW or HxWx1 (grey), HxWx3 (RGB) or HxWx4 (RGBA).
  """
  if isinstance(image, np.ndarray):
    if image.ndim == 2:
      image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"expected a uint8 HxW or HxWx1/3/4 array, got {image.dtype} {image.shape}")
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]  # Drops alpha.
    if image.shape[:2] != (size, size):
      image = PIL.Image.fromarray(image)
  if isinstance(image, PIL.Image.Image):
    image = image.convert("RGB")
    if image.size != (size, size):
      image = image.resize((size, size), PIL.Image.Resampling.BICUBIC)
    image = np.asarray(image)
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
