"""AnyRes images -> the model's static-shape inputs: per-group tile pools and token sources.

A batch's B rows form G contiguous groups of B/G rows; each group has a pool of Tg tile slots.
G is a multiple of the batch's shards (and micro-batches), so every group, with its rows, its
tiles and the gather between them, lives on one device. The arrays (VLM.encode_tiles):
  tiles  [G, Tg, t, t, 3]   uint8 or float32 (Preprocessing.dtype); zero tiles fill unused slots (never read)
  index  int32 [B, V, K]    token sources into [newline; the group's features]
  weight float32 [B, V, K]  (V: visual tokens per row, padded; K: taps, see anyres.Spec)
"""

import dataclasses
import math
from typing import Sequence

import ml_collections
import numpy as np

from vlm_jax.data import anyres
from vlm_jax.data import images as images_lib
from vlm_jax.errors import UserError


def spec_from_config(model_cfg: ml_collections.ConfigDict, tile_tokens: int) -> anyres.Spec:
  """tile_tokens: visual tokens of one tile (models.vlm.image_tokens), a square grid: the
  bridge's (the patch grid, or what pixel shuffle or pooling makes of it)."""
  v, a = model_cfg.vision, model_cfg.anyres
  side = math.isqrt(tile_tokens)
  if side * side != tile_tokens:
    raise ValueError(f"AnyRes tiles need a square grid of tokens, not {tile_tokens}")
  return anyres.Spec(
    tile=v.image_size,
    side=side,
    pinpoints=anyres.parse_pinpoints(a.grid_pinpoints, v.image_size),
    base_view=a.base_view,
    max_n=a.max_n,
  )


def for_config(config: ml_collections.ConfigDict, tile_tokens: int) -> "AnyRes | None":
  """The data side of AnyRes for a full config (tile_tokens: one tile's tokens), or None when it is off."""
  if not config.model.anyres.enabled:
    return None
  return AnyRes(config.model, images_lib.Preprocessing.from_config(config), tile_tokens)


@dataclasses.dataclass(frozen=True)
class Tiled:
  """One image ready for the model: its plan and its normalised tiles [plan.tiles, t, t, 3]."""

  plan: anyres.Plan
  tiles: np.ndarray


class AnyRes:
  """The data side of AnyRes for one config: token counts, tiles and batch arrays."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, pre: images_lib.Preprocessing, tile_tokens: int):
    self.spec = spec_from_config(model_cfg, tile_tokens)
    self.pre = pre  # its resample filter and normalisation

  def plan(self, image) -> anyres.Plan:
    return anyres.plan(images_lib.image_size(image), self.spec)

  def tokens(self, image) -> int:
    """Placeholder tokens the image's `<image>` expands to."""
    return self.plan(image).tokens

  def prepare(self, image) -> Tiled:
    p = self.plan(image)
    return Tiled(p, anyres.tiles(image, p, self.spec, self.pre))

  def tiles_per_group(self, max_tiles: int, groups: int, rows: int) -> int:
    """Tile slots per group from the per-batch budget (0: every row's largest plan)."""
    if max_tiles % groups:
      raise UserError(
        f"config.model.anyres.max_tiles ({max_tiles}) must be a multiple of the {groups} tile "
        "groups (batch shards x grad_accum)"
      )
    per_group = rows // groups * self.spec.max_tiles if max_tiles == 0 else max_tiles // groups
    if per_group < self.spec.max_tiles:
      raise UserError(
        f"config.model.anyres.max_tiles ({max_tiles}) gives {per_group} tiles per group "
        f"({groups} groups: batch shards x grad_accum), less than the {self.spec.max_tiles} "
        f"one image can need; raise it to at least {self.spec.max_tiles * groups}"
      )
    return per_group

  def collate(
    self, rows: Sequence[Sequence[Tiled]], *, groups: int, tiles_per_group: int, visual_len: int
  ) -> dict[str, np.ndarray]:
    """Each row's images in placeholder order -> {"tiles", "index", "weight"}; a row's visual
    tokens follow one another. Each group's images must fit its pool (PackBatches sees to it)."""
    b, t, k = len(rows), self.spec.tile, self.spec.taps
    if b % groups:
      raise ValueError(f"{b} rows do not split into {groups} groups")
    rows_per_group = b // groups
    tiles = np.zeros((groups, tiles_per_group, t, t, 3), self.pre.dtype)
    index = np.zeros((b, visual_len, k), np.int32)
    weight = np.zeros((b, visual_len, k), np.float32)
    used = [0] * groups
    for r, row in enumerate(rows):
      g, v = r // rows_per_group, 0
      for im in row:
        n = im.plan.tiles
        if used[g] + n > tiles_per_group:
          raise ValueError(f"group {g}: {used[g] + n} tiles > {tiles_per_group} slots")
        if v + im.plan.tokens > visual_len:
          raise ValueError(f"row {r}: {v + im.plan.tokens} visual tokens > {visual_len}")
        tiles[g, used[g] : used[g] + n] = im.tiles
        i, w = anyres.token_sources(im.plan, self.spec, first_tile=used[g])
        index[r, v : v + len(i)], weight[r, v : v + len(w)] = i, w
        used[g] += n
        v += len(i)
    return {"tiles": tiles, "index": index, "weight": weight}

  def collate_rows(self, rows: Sequence[Sequence[Tiled]], visual_len: int) -> dict[str, np.ndarray]:
    """Inference and eval: each row's images, one group per row with room for the most images
    of a row at their largest plan."""
    most = max(1, max(len(r) for r in rows))
    return self.collate(rows, groups=len(rows), tiles_per_group=most * self.spec.max_tiles, visual_len=visual_len)
