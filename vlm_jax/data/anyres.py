"""AnyRes tiling (LLaVA-NeXT, OneVision): tile plan, image -> tiles, visual-token layout.

Convention: every size here is (height, width), rows before columns, as everywhere in vlm-jax.
Pinpoints are (H, W) pixel pairs, read as transformers reads `image_grid_pinpoints` (the
original LLaVA-NeXT repo reads the same literals as (W, H); the symmetric NeXT list only differs
in which grid wins a tie, and we follow transformers). OneVision's "(1x1),...,(6x6)" is
(rows x cols) in tiles, expanded rows-outer as transformers' configs list it.

An image of H x W becomes: a base view (the whole image squashed to one tile) and the row-major
tiles of the image resized into the best pinpoint and centre-padded with black. The model
encodes each tile to S x S features; the grid's features form one map, the rows or columns that
are padding are dropped (unpad), anyres_max_N bilinearly shrinks a map larger than N tiles, and
a learned newline token ends each row. Tokens = S*S (base) + rows * (cols + 1).

An image too elongated for any grid (e.g. 20 x 2000) keeps no feature row after unpadding: as in
transformers, its tokens are the base view's alone (a very tall one keeps rows of zero width,
each still ended by its newline).
"""

import ast
import dataclasses
import math
import re
from typing import Sequence

import numpy as np
import PIL.Image

from vlm_jax.data import images as images_lib
from vlm_jax.errors import UserError

NEWLINE = 0  # token source index of image_newline; feature f of a group's pool is 1 + f


@dataclasses.dataclass(frozen=True)
class Spec:
  """What tiling does, from config.model (vision tile size and patches, config.model.anyres)."""

  tile: int  # pixels per tile side (the ViT's image_size)
  side: int  # features per tile side, S
  pinpoints: tuple[tuple[int, int], ...]  # candidate canvases, (H, W) pixels
  base_view: bool = True
  max_n: int = 0  # anyres_max_N: 0 = no cap

  @property
  def max_tiles(self) -> int:
    """Tiles of the largest plan: what one image may need at most."""
    return max(h * w for h, w in self.pinpoints) // self.tile**2 + int(self.base_view)

  @property
  def taps(self) -> int:
    """Features mixed into one visual token: 4 for the bilinear cap, else 1."""
    return 4 if self.max_n else 1


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one image is tiled and how many tokens it yields; sizes (H, W)."""

  image: tuple[int, int]  # original
  canvas: tuple[int, int]  # the chosen pinpoint
  grid: tuple[int, int]  # tile rows, cols
  resized: tuple[int, int]  # the image inside the canvas (before padding)
  unpadded: tuple[int, int]  # feature map after unpad
  features: tuple[int, int]  # after the anyres_max_N cap
  tiles: int  # encoded tiles, base view included
  tokens: int


def parse_pinpoints(text: str, tile: int) -> tuple[tuple[int, int], ...]:
  """ "[[336, 672], ...]" (H, W pixels), "(1x1),...,(6x6)" (a range of rows x cols) or
  "(1x2),(2x1)" (a list of rows x cols) -> (H, W) pixel pairs, each a multiple of `tile`."""
  where = f"config.model.anyres.grid_pinpoints {text!r}"
  grids = re.findall(r"\((\d+)\s*x\s*(\d+)\)", text)
  if grids:
    grids = [(int(r), int(c)) for r, c in grids]
    if "..." in text:
      (r0, c0), (r1, c1) = grids[0], grids[-1]
      grids = [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    pairs = [(r * tile, c * tile) for r, c in grids]
  else:
    try:
      pairs = [tuple(int(v) for v in p) for p in ast.literal_eval(text)]
    except (ValueError, SyntaxError, TypeError):
      raise UserError(f"{where}: expected [[H, W], ...] pixels or (RxC) grids") from None
  if not pairs:
    raise UserError(f"{where}: no pinpoints")
  for pair in pairs:
    if len(pair) != 2 or min(pair) < tile or pair[0] % tile or pair[1] % tile:
      raise UserError(f"{where}: {pair} is not an (H, W) pair of positive multiples of the tile size {tile}")
  return tuple(pairs)


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The pinpoint that keeps most of the image's pixels, then wastes least; ties go to the first."""
  h, w = size
  best, most, least_waste = None, 0, math.inf
  for ph, pw in pinpoints:
    scale = min(pw / w, ph / h)
    kept = min(int(w * scale) * int(h * scale), w * h)
    waste = ph * pw - kept
    if kept > most or (kept == most and waste < least_waste):
      best, most, least_waste = (ph, pw), kept, waste
  return best


def fit_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
  """The image's size resized into the canvas, aspect kept (one side fills it)."""
  h, w = size
  ch, cw = canvas
  scale_h, scale_w = ch / h, cw / w  # scale first, as LLaVA-NeXT: 3000 * (672 / 4000) rounds up to 505
  if scale_w < scale_h:
    return min(math.ceil(h * scale_w), ch), cw
  return ch, min(math.ceil(w * scale_h), cw)


def unpad_size(size: tuple[int, int], feature_map: tuple[int, int]) -> tuple[int, int]:
  """The feature map without the rows (or columns) that only saw padding."""
  h, w = size
  fh, fw = feature_map
  if w / h > fw / fh:  # the products in transformers' order: h * (fw / w) can round differently
    pad = (fh - int(round(h * (fw / w), 7))) // 2
    return fh - 2 * pad, fw
  pad = (fw - int(round(w * (fh / h), 7))) // 2
  return fh, fw - 2 * pad


def capped_size(size: tuple[int, int], spec: Spec) -> tuple[int, int]:
  """anyres_max_N: a map larger than N tiles (by 10%) is shrunk to about N tiles."""
  h, w = size
  if not spec.max_n:
    return size
  ratio = math.sqrt(h * w / (spec.max_n * spec.side**2))
  return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else size


def plan(size: tuple[int, int], spec: Spec) -> Plan:
  """The tile plan of an H x W image; UserError for images AnyRes cannot represent."""
  h, w = size
  if h < 1 or w < 1:
    raise UserError(f"image {h}x{w} (HxW): an image needs at least 1 pixel on each side")
  canvas = select_best_resolution(size, spec.pinpoints)
  grid = (canvas[0] // spec.tile, canvas[1] // spec.tile)
  unpadded = unpad_size(size, (grid[0] * spec.side, grid[1] * spec.side))
  features = capped_size(unpadded, spec)
  tokens = (spec.side**2 if spec.base_view else 0) + features[0] * (features[1] + 1)
  if not tokens:
    raise UserError(
      f"image {h}x{w} (HxW): so elongated that no feature row survives unpadding on the "
      f"{grid[0]}x{grid[1]} grid, and base_view is off: it would have no tokens; crop or pad it"
    )
  return Plan(
    image=(h, w),
    canvas=canvas,
    grid=grid,
    resized=fit_size(size, canvas),
    unpadded=unpadded,
    features=features,
    tiles=grid[0] * grid[1] + int(spec.base_view),
    tokens=tokens,
  )


def tiles(image: "PIL.Image.Image | np.ndarray", p: Plan, spec: Spec, pre: images_lib.Preprocessing) -> np.ndarray:
  """[p.tiles, tile, tile, 3] as pre.normalize makes them: the base view, then the grid row-major."""
  rgb = images_lib.to_rgb(image)
  t = spec.tile
  canvas = np.zeros(p.canvas + (3,), np.uint8)  # black padding, as LLaVA-NeXT
  top, left = (p.canvas[0] - p.resized[0]) // 2, (p.canvas[1] - p.resized[1]) // 2
  canvas[top : top + p.resized[0], left : left + p.resized[1]] = images_lib.resize(rgb, p.resized, pre.resample)
  grid = canvas.reshape(p.grid[0], t, p.grid[1], t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
  if spec.base_view:
    grid = np.concatenate([images_lib.resize(rgb, (t, t), pre.resample)[None], grid])
  return pre.normalize(grid)


def _bilinear(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """For each output position: (2 source indices, 2 weights), as torch's bilinear
  interpolate with align_corners=False (half-pixel centres, no antialiasing)."""
  # float32 arithmetic, as torch's: source positions carry its rounding (~1e-6 at position 40).
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
  i0 = src.astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  return np.stack([i0, i1], -1), np.stack([1 - frac, frac], -1)


def token_sources(p: Plan, spec: Spec, first_tile: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Where each of the image's p.tokens visual tokens comes from, in sequence order.

  -> (index int32 [tokens, taps], weight float32 [tokens, taps]): a token is the weighted sum of
  pool features index - 1 (feature f = tile * S*S + patch, tiles numbered from `first_tile`)
  or, for index NEWLINE, image_newline. Unused taps have weight 0.
  """
  s, k = spec.side, spec.taps
  per_tile = s * s
  base_tiles = int(spec.base_view)
  parts_i, parts_w = [], []
  if spec.base_view:
    parts_i.append(1 + first_tile * per_tile + np.arange(per_tile)[:, None])
    parts_w.append(np.ones((per_tile, 1), np.float32))
  # Feature (y, x) of the grid's full map: tile (y // S, x // S), patch (y % S, x % S).
  gh, gw = p.grid[0] * s, p.grid[1] * s
  uh, uw = p.unpadded
  ys = np.arange(uh) + (gh - uh) // 2
  xs = np.arange(uw) + (gw - uw) // 2
  fh, fw = p.features
  if (fh, fw) == (uh, uw):
    yi, yw = ys[:, None], np.ones((fh, 1), np.float32)
    xi, xw = xs[:, None], np.ones((fw, 1), np.float32)
  else:
    yi, yw = _bilinear(uh, fh)
    xi, xw = _bilinear(uw, fw)
    yi, xi = ys[yi], xs[xi]
  y, x = yi[:, None, :, None], xi[None, :, None, :]  # [fh, fw, ty, tx]
  tile = first_tile + base_tiles + (y // s) * p.grid[1] + x // s
  index = 1 + tile * per_tile + (y % s) * s + x % s
  index = index.reshape(fh, fw, yi.shape[1] * xi.shape[1])  # fh or fw may be 0 (elongated images)
  weight = (yw[:, None, :, None] * xw[None, :, None, :]).reshape(index.shape).astype(np.float32)
  # A newline token closes each row.
  newline_i = np.full((fh, 1, index.shape[-1]), NEWLINE)
  newline_w = np.zeros((fh, 1, index.shape[-1]), np.float32)
  newline_w[..., 0] = 1
  parts_i.append(np.concatenate([index, newline_i], axis=1).reshape(-1, index.shape[-1]))
  parts_w.append(np.concatenate([weight, newline_w], axis=1).reshape(-1, index.shape[-1]))
  return (
    np.concatenate([_pad_taps(i, k) for i in parts_i]).astype(np.int32),
    np.concatenate([_pad_taps(w, k) for w in parts_w]).astype(np.float32),
  )


def _pad_taps(x: np.ndarray, k: int) -> np.ndarray:
  return np.pad(x, ((0, 0), (0, k - x.shape[1])))
