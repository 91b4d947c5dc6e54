"""config.model.anyres: AnyRes (LLaVA-NeXT) tiling."""

import ml_collections

from vlm_jax.errors import UserError


def defaults() -> ml_collections.ConfigDict:
  # AnyRes (LLaVA-NeXT) tiling, see vlm_jax/data/anyres.py: tiles of vision.image_size pixels.
  return ml_collections.ConfigDict(
    dict(
      enabled=False,
      # Candidate canvases: (RxC) tile grids (rows x cols), "(1x1),...,(6x6)" for a range
      # (OneVision), or [[H, W], ...] in pixels as transformers' image_grid_pinpoints. LLaVA-NeXT's:
      grid_pinpoints="(1x2),(2x1),(2x2),(3x1),(1x3)",
      base_view=True,  # a downscaled whole-image tile first (S*S tokens)
      max_n=0,  # anyres_max_N: maps larger than N tiles are shrunk (OneVision: 9); 0 = off
      max_tiles=0,
    )
  )  # tiles per global batch (one ViT call); 0 = every row's largest plan


def check(config: ml_collections.ConfigDict) -> None:
  """What AnyRes needs of the fields (the vision tower's and data's too); its grids and bridge
  are checked by build.validate."""
  m, d = config.model, config.data
  if not m.anyres.enabled:
    return
  if m.vision.keep_cls:
    raise UserError("config.model.anyres: tiles are patch grids; set config.model.vision.keep_cls=False")
  if m.anyres.max_n < 0 or m.anyres.max_tiles < 0:
    raise UserError("config.model.anyres.max_n and max_tiles must be >= 0")
  if d.image_pool:
    raise UserError("config.data.image_pool: AnyRes pools its tiles itself (config.model.anyres.max_tiles); leave it 0")
  if d.image_resize != "squash":
    raise UserError(
      f"config.data.image_resize: {d.image_resize!r} with AnyRes, which tiles the "
      "image itself (its base view is squashed); leave it 'squash'"
    )
