"""Image loading and the model's input preprocessing, as the checkpoint's image processor does it.

One `Preprocessing` serves training, generation and eval. Its resize modes are those of the
image processors LLaVA-family checkpoints ship with (transformers' PIL backend, step for step):
  squash              resize to size x size, aspect not kept (SigLIP processors; our default)
  shortest_edge_crop  resize the short side to short_side, centre-crop size x size
                      (CLIPImageProcessor: llava-1.5-hf and most CLIP-based checkpoints)
  pad_square          pad to a square with the fill colour, then as shortest_edge_crop
                      (the original LLaVA-1.5 recipe, LlavaImageProcessor(do_pad=True))
then scale to [0, 1] and normalise with mean and std. With data.images_uint8 (the default) the
last step is left to the model (VLM normalises uint8 input on device with the same mean and std):
a quarter of the bytes go from host to device, and the host does less per image.
"""

import dataclasses
import math
import os
from typing import Sequence

import ml_collections
import numpy as np
import PIL.Image

from vlm_jax.config import RESAMPLE
from vlm_jax.errors import UserError


def load_image(path: str) -> PIL.Image.Image:
  """An RGB image from a file; UserError naming the file if it is missing or unreadable."""
  if not os.path.isfile(path):
    raise UserError(f"image file not found: {path}")
  try:
    with PIL.Image.open(path) as image:
      return PIL.Image.fromarray(to_rgb(image))  # to_rgb also forces the lazy decode inside `with`.
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise UserError(f"cannot read image {path}: {e}") from None


def to_rgb(image: "PIL.Image.Image | np.ndarray") -> np.ndarray:
  """uint8 [H, W, 3]; transparency is composited onto white, as transformers' convert_to_rgb.

  Arrays are uint8 HxW or HxWx1 (grey), HxWx3 (RGB) or HxWx4 (RGBA).
  """
  if isinstance(image, PIL.Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
      image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected a uint8 HxW or HxWx1/3/4 array, got {image.dtype} {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    alpha = image[..., 3:] / 255
    return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return image


def image_size(image: "PIL.Image.Image | np.ndarray") -> tuple[int, int]:
  """(H, W) of a PIL image (whose .size is (W, H)) or an HxW[xC] array."""
  if isinstance(image, np.ndarray):
    return image.shape[0], image.shape[1]
  return image.size[1], image.size[0]


def resize(rgb: np.ndarray, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size]; size is (H, W) (PIL takes (W, H))."""
  image = PIL.Image.fromarray(rgb)
  return np.asarray(image.resize((size[1], size[0]), RESAMPLE[resample]))


def short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
  """(H, W) with the short side resized to `short`, as transformers' get_resize_output_image_size."""
  h, w = size
  lo, hi = (w, h) if w <= h else (h, w)
  long = int(short * hi / lo)
  return (long, short) if w <= h else (short, long)


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
  """The centre size x size of x [H, W, ...]; a smaller image is first zero-padded around (as
  transformers' center_crop)."""
  h, w = x.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  if top >= 0 and left >= 0:
    return x[top : top + size, left : left + size]
  ph, pw = max(size, h), max(size, w)
  pad_top, pad_left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
  padded = np.zeros((ph, pw) + x.shape[2:], x.dtype)
  padded[pad_top : pad_top + h, pad_left : pad_left + w] = x
  top, left = top + pad_top, left + pad_left
  return padded[max(0, top) : top + size, max(0, left) : left + size]


def mean_fill(mean: Sequence[float]) -> tuple[int, ...]:
  """LlavaImageProcessor's (and LLaVA's expand2square) pad colour for a mean: int(m * 255) each."""
  return tuple(int(m * 255) for m in mean)


def pad_square(rgb: np.ndarray, fill: Sequence[int]) -> np.ndarray:
  """The image centred on a square of its long side, filled with `fill` (LLaVA's expand2square)."""
  h, w = rgb.shape[:2]
  if h == w:
    return rgb
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[:] = np.asarray(fill, np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  out[top : top + h, left : left + w] = rgb
  return out


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """An image -> the model's [size, size, 3] input: uint8 pixels when on_device (the model
  normalises them), else float32 normalised here. Picklable (loader worker processes)."""

  size: int  # the ViT's input side: every crop ends at it
  resize: str = "squash"  # one of config.RESIZE_MODES
  short_side: int = 0  # shortest_edge_crop, pad_square: 0 = size
  fill: tuple[int, ...] = ()  # pad_square colour, RGB 0-255; () = the mean colour
  resample: str = "bicubic"  # a key of RESAMPLE
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)
  on_device: bool = False  # normalise on device: the input stays uint8

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Preprocessing":
    d = config.data
    return cls(
      size=config.model.vision.image_size,
      resize=d.image_resize,
      short_side=d.image_short_side,
      fill=tuple(d.image_fill),
      resample=d.image_resample,
      mean=tuple(d.image_mean),
      std=tuple(d.image_std),
      on_device=d.images_uint8,
    )

  @property
  def dtype(self) -> type:
    """The dtype of the model input it makes."""
    return np.uint8 if self.on_device else np.float32

  @property
  def fill_color(self) -> tuple[int, ...]:
    """The pad colour: fill if given, else the mean's (mean_fill)."""
    return tuple(self.fill) or mean_fill(self.mean)

  def pixels(self, image: "PIL.Image.Image | np.ndarray") -> np.ndarray:
    """uint8 [size, size, 3]: the resized (and cropped or padded) image."""
    rgb = to_rgb(image)
    if self.resize == "squash":
      return resize(rgb, (self.size, self.size), self.resample)
    if self.resize == "pad_square":
      rgb = pad_square(rgb, self.fill_color)
    rgb = resize(rgb, short_side_size(rgb.shape[:2], self.short_side or self.size), self.resample)
    return center_crop(rgb, self.size)

  def normalize(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> the model input: as it is when on_device, else float32 scaled to [0, 1]
    and normalised."""
    if self.on_device:
      return pixels
    x = pixels.astype(np.float32) / 255.0  # VLM.pixels does the same on device
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def __call__(self, image: "PIL.Image.Image | np.ndarray") -> np.ndarray:
    return self.normalize(self.pixels(image))
