"""config.data: the sources, tokenizer and template, the image processor and the loader."""

import ml_collections

from vlm_jax.config.checks import check_one_of
from vlm_jax.errors import UserError

IMAGE_POSITIONS = ("before", "after")  # where <image> goes when a prompt does not say
# How an image becomes the ViT's square input (vlm_jax/data/images.py).
RESIZE_MODES = ("squash", "shortest_edge_crop", "pad_square")
# PIL's filter codes, which transformers' image processors store as `resample`.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def defaults() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.sources = "shapes"
  d.tokenizer = "shapes"
  d.template = "simple"
  d.image_position = "before"  # where <image> goes when a prompt or sample does not say
  d.seq_len = 128
  # The image processor (vlm_jax/data/images.py; import reads the checkpoint's): squash |
  # shortest_edge_crop | pad_square, each ending at the ViT's image_size. AnyRes tiles itself
  # (its base view is squashed).
  d.image_resize = "squash"
  d.image_short_side = 0  # shortest_edge_crop / pad_square: short side before the crop (0 = image_size)
  d.image_fill = ()  # pad_square colour, RGB 0-255; () = int(image_mean * 255)
  d.image_resample = "bicubic"  # nearest | lanczos | bilinear | bicubic | box | hamming
  d.image_mean = (0.5, 0.5, 0.5)
  d.image_std = (0.5, 0.5, 0.5)
  # Images go to the device as uint8 pixels and the model normalises them (a quarter of the
  # bytes); False: float32, normalised on the host. The same model input either way.
  d.images_uint8 = True
  d.strict = False  # True: a bad sample stops the run (else it is skipped and counted)
  d.pack = False  # several samples per row (segment ids, restarted positions)
  d.max_images = 1  # image slots per row (multi-image samples; packed rows share them)
  # Images per global batch through the ViT: rows fill a shared pool (per batch shard), so empty
  # image slots (text-only samples, packed rows with fewer images) cost no ViT work. 0: every
  # row's max_images slots, empty ones included. AnyRes pools its tiles (model.anyres.max_tiles).
  d.image_pool = 0
  d.workers = 0  # loader processes that prepare and batch (0: in the training process)
  d.threads = 4  # reader threads per loader process (image decode and resize)
  d.prefetch = 2  # batches prefetched per loader process
  d.tfds_dir = ""  # TFDS data_dir for tfds: specs ("" = TFDS_DATA_DIR or ~/tensorflow_datasets)
  return d


def check_image_position(position: str) -> None:
  check_one_of("config.data.image_position", position, IMAGE_POSITIONS)


def check(d: ml_collections.ConfigDict) -> None:
  """The image processor's fields and the image pool; sources, tokenizer and template are read
  (and checked) when the run starts."""
  check_image_position(d.image_position)
  check_one_of("config.data.image_resize", d.image_resize, RESIZE_MODES)
  check_one_of("config.data.image_resample", d.image_resample, RESAMPLE)
  if d.image_short_side < 0:
    raise UserError(f"config.data.image_short_side must be >= 0, got {d.image_short_side}")
  if d.image_fill and (
    len(d.image_fill) != 3 or any(not isinstance(v, int) or not 0 <= v <= 255 for v in d.image_fill)
  ):
    raise UserError(f"config.data.image_fill: {tuple(d.image_fill)} is not () or three integers 0-255")
  for name in ("image_mean", "image_std"):
    if len(d[name]) != 3:
      raise UserError(f"config.data.{name}: expected 3 values (R, G, B), got {tuple(d[name])}")
  if 0 in tuple(d.image_std):
    raise UserError(f"config.data.image_std: {tuple(d.image_std)} has a zero")
  if d.image_pool < 0:
    raise UserError(f"config.data.image_pool must be >= 0 (0: every image slot), got {d.image_pool}")
