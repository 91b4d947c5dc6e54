"""config.model.vision: the vision tower (ViT)."""

import ml_collections

from vlm_jax.errors import UserError


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      flavour="siglip",
      image_size=64,
      patch_size=8,
      width=128,
      depth=2,
      heads=4,
      mlp_dim=512,
      norm_eps=1e-6,
      keep_cls=False,
      final_norm=False,
      act="",  # "" = the flavour's (quick_gelu for CLIP, gelu_tanh for SigLIP)
      # ToMe (models/token_merging.py): tokens merged per block, by bipartite soft matching with
      # proportional attention; the VLM reads depth * r fewer tokens (less at most half a block).
      # Needs a bridge that does not read the patch grid (linear, mlp2x_gelu, perceiver, qformer).
      token_merging=0,
      # A contrastive run's workdir (or step dir) whose ViT starts this run's, e.g. one trained by
      # configs/siglip_shapes.py; its first `depth` blocks are taken (LLaVA reads a layer before the last).
      init_from="",
    )
  )


def check(v: ml_collections.ConfigDict) -> None:
  """The shapes fit; flavour and act name registry entries (build.validate)."""
  if v.image_size % v.patch_size:
    raise UserError("config.model.vision.image_size must be a multiple of patch_size")
  if v.token_merging < 0:
    raise UserError(
      f"config.model.vision.token_merging must be >= 0 (tokens merged per ViT block; 0: off), got {v.token_merging}"
    )
  if v.width % v.heads:
    raise UserError("config.model.vision.width must be a multiple of heads")
