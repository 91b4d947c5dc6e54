"""The VLM: images -> ViT -> bridge -> visual tokens written into the `<image>` placeholder slots -> LLM."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import check_one_of
from vlm_jax.errors import UserError
from vlm_jax.models import attention as attention_lib
from vlm_jax.models import bridge as bridge_lib
from vlm_jax.models import vit as vit_lib
from vlm_jax.models.layers import ACTIVATIONS, REMAT_POLICIES, Compute, logical
from vlm_jax.models.llm import LLM, unstack_layers
from vlm_jax.models.vit import ViT


def image_tokens(model_cfg: ml_collections.ConfigDict) -> int:
  """Placeholder tokens one image occupies in the sequence (AnyRes: one tile's; an image's tile
  plan decides its count, see data/anyres.py)."""
  return bridge_lib.num_output_tokens(model_cfg.bridge, vit_lib.num_output_tokens(model_cfg.vision),
                                      vit_lib.grid_side(model_cfg.vision))


def check_config(model_cfg: ml_collections.ConfigDict) -> None:
  """The choices config.model makes among the models' registries (bridges, ViT flavours,
  activations, remat policies); config.validate checks the rest."""
  m = model_cfg
  check_one_of("config.model.remat", m.remat, REMAT_POLICIES)
  check_one_of("config.model.attention", m.attention, attention_lib.IMPLEMENTATIONS)
  check_one_of("config.model.vision.flavour", m.vision.flavour, vit_lib.FLAVOURS)
  if m.vision.act:
    check_one_of("config.model.vision.act", m.vision.act, ACTIVATIONS)
  check_one_of("config.model.llm.mlp_act", m.llm.mlp_act, ACTIVATIONS)
  bridge = bridge_lib.kind_of(m.bridge)
  side = vit_lib.grid_side(m.vision)
  bridge.check(m, side)
  if not bridge.per_patch and bridge.side is not None and vit_lib.num_output_tokens(m.vision) != side ** 2:
    raise UserError(f"config.model.vision.keep_cls: the {m.bridge.kind} bridge reads the patch grid; set it False")
  if m.anyres.enabled and bridge.side is None:
    grid_bridges = [k for k, v in bridge_lib.BRIDGES.items() if v.side is not None]
    raise UserError(f"config.model.anyres: needs a bridge that yields a grid of tokens ({', '.join(grid_bridges)}), "
                    f"not {m.bridge.kind}")


def scatter_visual(embeds: jax.Array, visual: jax.Array, is_placeholder: jax.Array) -> jax.Array:
  """Writes visual tokens, in order, into the placeholder positions of each row.

  embeds [B,L,D]; visual [B,V,D] (all images of a row, flattened in order); is_placeholder [B,L].
  The k-th placeholder of a row takes visual[k]: static shapes, no data-dependent gather sizes.
  """
  index = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, index[..., None], axis=1).astype(embeds.dtype)
  return jnp.where(is_placeholder[..., None], gathered, embeds)


def unstack_params(params: dict) -> dict:
  """Params in the layout of VLM(layer_list=True): the LLM's layers one subtree each."""
  return dict(params, llm=unstack_layers(params["llm"]))


class VLM(nn.Module):
  cfg: ml_collections.ConfigDict          # config.model
  image_token_id: int
  # uint8 images are scaled to [0, 1] and normalised with these (config.data.image_mean/std);
  # float images come normalised.
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  layer_list: bool = False                # decoding: params from unstack_params (LLM.layer_list)

  def setup(self):
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    compute = Compute.of(c)
    self.vision = ViT(c.vision, dtype, compute)
    self.bridge = bridge_lib.make_bridge(c.bridge, c.llm.width, dtype)
    self.llm = LLM(c.llm, dtype, compute, self.layer_list)
    if c.anyres.enabled:  # LLaVA-NeXT's row end marker, randn / sqrt(width) as there
      self.image_newline = self.param("image_newline", logical(
          nn.initializers.normal(1 / math.sqrt(c.llm.width)), ("embed",)), (c.llm.width,))

  def pixels(self, images: jax.Array) -> jax.Array:
    return vit_lib.normalize_pixels(images, self.image_mean, self.image_std)

  def encode_images(self, images: "jax.Array | dict") -> jax.Array:
    """images [B, N, H, W, 3] (uint8 or normalised float) -> visual tokens [B, N * image_tokens,
    llm_width]; pooled images: encode_pool; AnyRes: encode_tiles."""
    if self.cfg.anyres.enabled:
      return self.encode_tiles(images)
    if isinstance(images, dict):
      return self.encode_pool(images)
    b, n = images.shape[:2]
    visual = self.bridge(self.vision(self.pixels(images.reshape((b * n,) + images.shape[2:]))))
    return visual.reshape(b, n * visual.shape[1], visual.shape[2])

  def encode_pool(self, images: dict) -> jax.Array:
    """Pooled images (data.image_pool): {"pool" [G, P, H, W, 3], "index" [B, V]} -> visual
    tokens [B, V, D]. Only the pool goes through the ViT; token v of a row is feature index[v]
    of its group's [P * image_tokens] features (data/packing.py ImagePool)."""
    pool, index = images["pool"], images["index"]
    g, p = pool.shape[:2]
    feats = self.bridge(self.vision(self.pixels(pool.reshape((g * p,) + pool.shape[2:]))))
    feats = feats.reshape(g, -1, feats.shape[-1])
    b, v = index.shape
    return jnp.take_along_axis(feats, index.reshape(g, -1, 1), axis=1).reshape(b, v, -1)

  def encode_tiles(self, images: dict) -> jax.Array:
    """AnyRes: {"tiles" [G, Tg, t, t, 3], "index", "weight" [B, V, K]} -> visual tokens [B, V, D].

    All tiles of the batch go through the ViT in one call. The batch's rows form G contiguous
    groups, each with a pool of Tg tiles (padding tiles are never read). Visual token v of a row
    is sum_k weight * pool[index], where pool[0] is image_newline and pool[1 + f] is feature f
    of the group's tiles: unpad, newline order and the anyres_max_N bilinear shrink are all in
    the host-built index (data/anyres.py), so every shape is static.
    """
    tiles, index, weight = images["tiles"], images["index"], images["weight"]
    g, tg = tiles.shape[:2]
    b, v, k = index.shape
    feats = self.bridge(self.vision(self.pixels(tiles.reshape((g * tg,) + tiles.shape[2:]))))
    d = feats.shape[-1]
    newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (g, 1, d))
    pool = jnp.concatenate([newline, feats.reshape(g, -1, d)], axis=1)
    gathered = jnp.take_along_axis(pool, index.reshape(g, -1, 1), axis=1).reshape(b, v, k, d)
    return jnp.einsum("bvkd,bvk->bvd", gathered, weight.astype(gathered.dtype))

  def embed(self, tokens: jax.Array, images: jax.Array) -> jax.Array:
    """Token embeddings with the visual tokens written into the placeholder slots."""
    embeds = self.llm.embed(tokens)
    return scatter_visual(embeds, self.encode_images(images), tokens == self.image_token_id)

  def prefill(self, tokens: jax.Array, images: "jax.Array | dict", cache: dict) -> tuple[jax.Array, dict]:
    """Left-padded prompts [B, T] with their images -> (logits of the last token, the cache)."""
    return self.llm.extend(self.embed(tokens, images), cache)

  def extend(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Next tokens [B, T] (decode: T = 1) -> (logits of the last one [B, vocab], the cache)."""
    return self.llm.extend(self.llm.embed(tokens), cache)

  def loss(self, tokens: jax.Array, images: jax.Array, positions: jax.Array, segment_ids: jax.Array,
           targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (summed fp32 next-token loss over the supervised targets, their count)."""
    return self.llm.loss(self.embed(tokens, images), positions, segment_ids, targets, loss_mask)

  def __call__(self, tokens: jax.Array, images: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """-> fp32 logits [B, L, vocab]."""
    return self.llm(self.embed(tokens, images), positions, segment_ids)
