"""A checkpoint's image processor <-> config.data's image fields (vlm_jax/data/images.py).

transformers (5.x) saves it inside processor_config.json ("image_processor"); older
checkpoints have preprocessor_config.json. The processors LLaVA-family checkpoints ship with map
onto our resize modes: CLIPImageProcessor (shortest edge + centre crop, or a square size),
SiglipImageProcessor (squash), LlavaImageProcessor (do_pad: LLaVA-1.5's pad to a square with the
mean colour) and LlavaNextImageProcessor (AnyRes; its base view is squashed). We reproduce their
PIL backend; with torchvision installed transformers defaults to its torchvision backend, whose
antialiased resize differs slightly (backend="pil" gives ours). Anything we do not reproduce is
said in one warning line at import, never silently.
"""

import logging
import math

import ml_collections

from vlm_jax.config import RESAMPLE
from vlm_jax.data.images import Preprocessing, mean_fill
from vlm_jax.errors import UserError
from vlm_jax.files import read_json

log = logging.getLogger("vlm_jax")

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
_CLIP = dict(
  size={"shortest_edge": 224},
  crop_size={"height": 224, "width": 224},
  do_resize=True,
  do_center_crop=True,
  resample=3,
  do_rescale=True,
  rescale_factor=1 / 255,
  do_normalize=True,
  image_mean=CLIP_MEAN,
  image_std=CLIP_STD,
  do_pad=False,
)
# Class defaults of the processors we reproduce (a saved config may omit any field).
KINDS = {
  "CLIPImageProcessor": _CLIP,
  "LlavaImageProcessor": _CLIP,
  "LlavaNextImageProcessor": {**_CLIP, "do_pad": True},  # do_pad there pads the tile count of a batch
  "SiglipImageProcessor": {
    **_CLIP,
    "size": {"height": 224, "width": 224},
    "do_center_crop": False,
    "crop_size": None,
    "image_mean": HALF,
    "image_std": HALF,
  },
}
ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor"}
UNKNOWN = {**_CLIP, "do_center_crop": False, "crop_size": None}  # another processor: only what it says
RESAMPLE_NAMES = {code: name for name, code in RESAMPLE.items()}


def find(directory: str) -> tuple[dict | None, str]:
  """(the image processor config, the file it is in), or (None, "") if the directory has none."""
  processor = read_json(directory, "processor_config.json", required=False) or {}
  if isinstance(processor.get("image_processor"), dict):
    return processor["image_processor"], "processor_config.json"
  pre = read_json(directory, "preprocessor_config.json", required=False)
  return (pre, "preprocessor_config.json") if pre is not None else (None, "")


def kind_of(cfg: dict) -> str:
  """The processor's class without backend suffixes: CLIPImageProcessorFast -> CLIPImageProcessor."""
  name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
  for suffix in ("Fast", "Pil"):
    name = name.removesuffix(suffix)
  return ALIASES.get(name, name)


def _square(size, image_size: int) -> bool:
  return isinstance(size, dict) and size.get("height") == size.get("width") == image_size


def read(directory: str, flavour: str, image_size: int, anyres: bool) -> dict:
  """The directory's image processor as config.data fields (image_resize, image_short_side,
  image_fill, image_resample, image_mean, image_std). Steps we do not reproduce are warned about."""
  cfg, name = find(directory)
  if cfg is None:  # e.g. a bare vision tower: the tower's usual normalisation, squashed
    mean, std = (CLIP_MEAN, CLIP_STD) if flavour == "clip" else (HALF, HALF)
    log.warning(
      "%s: no image processor (processor_config.json or preprocessor_config.json); images are "
      "squashed to %d px and normalised as %s towers usually are",
      directory,
      image_size,
      flavour,
    )
    return dict(
      image_resize="squash", image_short_side=0, image_fill=(), image_resample="bicubic", image_mean=mean, image_std=std
    )
  where = f"{directory}/{name}"
  kind = kind_of(cfg)
  if kind not in KINDS:
    log.warning(
      "%s: %s is not an image processor vlm-jax reproduces (%s); its resize, crop and "
      "normalisation fields are read, its other steps are not done",
      where,
      kind or "an unnamed processor",
      ", ".join(KINDS),
    )
  get = lambda key: cfg[key] if cfg.get(key) is not None else KINDS.get(kind, UNKNOWN)[key]
  resample = RESAMPLE_NAMES.get(get("resample"))
  if resample is None:
    log.warning("%s: resample %r is not a PIL filter code; vlm-jax resizes with bicubic", where, get("resample"))
    resample = "bicubic"
  mean, std = _normalization(get, where)
  size, crop = get("size"), (get("crop_size") if get("do_center_crop") else None)
  if not get("do_resize"):
    log.warning("%s: do_resize is false; vlm-jax resizes to the vision tower's %d px anyway", where, image_size)
  if crop is not None and not _square(crop, image_size):
    raise UserError(f"{where}: crop_size {crop} is not the vision tower's image_size {image_size}")
  fields = dict(
    image_resize="squash", image_short_side=0, image_fill=(), image_resample=resample, image_mean=mean, image_std=std
  )
  if anyres:
    edge = size.get("shortest_edge") if isinstance(size, dict) else None
    if edge != image_size and not _square(size, image_size):
      raise UserError(
        f"{where}: size {size} is not the AnyRes tile size {image_size} (config.json's vision image_size)"
      )
    return fields
  pad = kind == "LlavaImageProcessor" and get("do_pad")
  if isinstance(size, dict) and set(k for k, v in size.items() if v) == {"shortest_edge"}:
    if crop is None:
      log.warning(
        "%s: size shortest_edge without a centre crop gives non-square inputs; vlm-jax squashes the image instead",
        where,
      )
    else:
      fields.update(
        image_resize="pad_square" if pad else "shortest_edge_crop",
        image_short_side=0 if size["shortest_edge"] == image_size else int(size["shortest_edge"]),
      )
  elif isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width"):
    if size["height"] != image_size:
      log.warning(
        "%s: size %s then a crop to %d is not reproduced; vlm-jax squashes to %d", where, size, image_size, image_size
      )
    if pad:
      fields.update(image_resize="pad_square")  # padded to a square, a square resize is the short side's
  else:
    log.warning(
      "%s: size %s is not reproduced (shortest_edge or a square height/width); vlm-jax squashes to %d",
      where,
      size,
      image_size,
    )
  fill = mean_fill(get("image_mean"))  # LlavaImageProcessor's, from the mean as saved
  if fields["image_resize"] == "pad_square" and fill != mean_fill(mean):
    fields["image_fill"] = fill  # only when a rescale factor folded into the mean changed it
  return fields


def _normalization(get, where: str) -> tuple[tuple, tuple]:
  """mean and std on the [0, 1] scale that absorb the processor's rescale factor: (x * f - m) / s
  = (x / 255 - m / (255 f)) / (s / (255 f))."""
  mean = tuple(float(v) for v in get("image_mean")) if get("do_normalize") else (0.0, 0.0, 0.0)
  std = tuple(float(v) for v in get("image_std")) if get("do_normalize") else (1.0, 1.0, 1.0)
  if len(mean) != 3 or len(std) != 3:
    raise UserError(f"{where}: image_mean and image_std need 3 values (RGB), got {mean}, {std}")
  factor = float(get("rescale_factor")) if get("do_rescale") else 1.0
  k = 255 * factor
  if not math.isclose(k, 1.0, rel_tol=1e-9):
    mean, std = tuple(m / k for m in mean), tuple(s / k for s in std)
  return mean, std


def to_hf(config: ml_collections.ConfigDict, base: dict | None = None) -> dict:
  """config.data's image fields as an image processor config doing the same thing, on top of
  `base` (the checkpoint's own, whose other fields are kept)."""
  pre = Preprocessing.from_config(config)
  size = pre.size
  out = dict(base or {})
  kind = kind_of(out)
  if config.model.anyres.enabled:
    from vlm_jax.data import anyres  # numpy + PIL only

    new_kind = "LlavaNextImageProcessor"
    out.update(
      size={"shortest_edge": size},
      crop_size={"height": size, "width": size},
      do_center_crop=True,
      do_pad=True,
      image_grid_pinpoints=[list(p) for p in anyres.parse_pinpoints(config.model.anyres.grid_pinpoints, size)],
    )
  elif pre.resize == "pad_square":
    if pre.fill_color != mean_fill(pre.mean):
      raise UserError(
        f"config.data.image_fill {pre.fill} cannot be written as a HF LlavaImageProcessor, which "
        "pads with int(image_mean * 255)"
      )
    new_kind = "LlavaImageProcessor"
    out.update(
      size={"shortest_edge": pre.short_side or size},
      crop_size={"height": size, "width": size},
      do_center_crop=True,
      do_pad=True,
    )
  else:
    new_kind = (
      kind if kind in ("CLIPImageProcessor", "LlavaImageProcessor", "SiglipImageProcessor") else "CLIPImageProcessor"
    )
    if pre.resize == "squash":
      out.update(size={"height": size, "width": size}, do_center_crop=False)
    else:
      out.update(
        size={"shortest_edge": pre.short_side or size}, crop_size={"height": size, "width": size}, do_center_crop=True
      )
    if new_kind == "LlavaImageProcessor":
      out["do_pad"] = False
  if new_kind != kind:
    out.pop("feature_extractor_type", None)
  out.update(
    image_processor_type=new_kind,
    do_resize=True,
    resample=RESAMPLE[pre.resample],
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(pre.mean),
    image_std=list(pre.std),
    do_convert_rgb=True,
  )
  return out
