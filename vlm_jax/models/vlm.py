"""The VLM: images -> ViT -> bridge -> visual tokens -> LLM, the tokens either written into the
`<image>` placeholder slots (fusion "tokens") or read by gated cross-attention blocks between the
LLM's layers (fusion "cross_attention", models/fusion.py)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import check_one_of
from vlm_jax.errors import UserError
from vlm_jax.models import attention as attention_lib
from vlm_jax.models import bridge as bridge_lib
from vlm_jax.models import fusion as fusion_lib
from vlm_jax.models import vit as vit_lib
from vlm_jax.models.layers import ACTIVATIONS, REMAT_POLICIES, Compute, logical
from vlm_jax.models.llm import LLM, unstack_layers
from vlm_jax.models.vit import ViT


def image_tokens(model_cfg: ml_collections.ConfigDict) -> int:
  """Placeholder tokens one image occupies in the sequence (AnyRes: one tile's; an image's tile
  plan decides its count, see data/anyres.py; cross-attention fusion: its one marker)."""
  if model_cfg.fusion == "cross_attention":
    return 1
  return visual_tokens(model_cfg)


def visual_tokens(model_cfg: ml_collections.ConfigDict) -> int:
  """The bridge's tokens of one image (or tile)."""
  return bridge_lib.num_output_tokens(
    model_cfg.bridge, vit_lib.num_output_tokens(model_cfg.vision), vit_lib.grid_side(model_cfg.vision)
  )


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
  check_one_of("config.model.fusion", m.fusion, fusion_lib.FUSIONS)
  if m.fusion == "cross_attention":
    fusion_lib.check(m)
  bridge = bridge_lib.kind_of(m.bridge)
  side = vit_lib.grid_side(m.vision)
  bridge.check(m, side)
  if m.vision.token_merging and (m.anyres.enabled or (bridge.side is not None and not bridge.per_patch)):
    readers = [k for k, v in bridge_lib.BRIDGES.items() if v.side is None or v.per_patch]
    raise UserError(
      f"config.model.vision.token_merging: merged tokens are no patch grid, which "
      f"{'AnyRes' if m.anyres.enabled else f'the {m.bridge.kind} bridge'} reads; use a bridge that "
      f"takes any tokens ({', '.join(readers)}) without AnyRes, or set it 0"
    )
  if not bridge.per_patch and bridge.side is not None and vit_lib.num_output_tokens(m.vision) != side**2:
    raise UserError(f"config.model.vision.keep_cls: the {m.bridge.kind} bridge reads the patch grid; set it False")
  if m.anyres.enabled and bridge.side is None:
    grid_bridges = [k for k, v in bridge_lib.BRIDGES.items() if v.side is not None]
    raise UserError(
      f"config.model.anyres: needs a bridge that yields a grid of tokens ({', '.join(grid_bridges)}), "
      f"not {m.bridge.kind}"
    )


def scatter_visual(embeds: jax.Array, visual: jax.Array, is_placeholder: jax.Array) -> jax.Array:
  """Writes visual tokens, in order, into the placeholder positions of each row.

  embeds [B,L,D]; visual [B,V,D] (all images of a row, flattened in order); is_placeholder [B,L].
  The k-th placeholder of a row takes visual[k]: static shapes, no data-dependent gather sizes.
  """
  index = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, index[..., None], axis=1).astype(embeds.dtype)
  return jnp.where(is_placeholder[..., None], gathered, embeds)


def pool_gather(items: jax.Array, index: jax.Array) -> jax.Array:
  """items [G, K, ...] (a group's pool of K tokens or images), index [B, V] (rows in G contiguous
  groups, each entry an item of its row's group) -> [B, V, ...]."""
  g, per_row = items.shape[0], index.size // items.shape[0]
  flat = items.reshape(g, items.shape[1], -1)
  picked = jnp.take_along_axis(flat, index.reshape(g, per_row, 1), axis=1)
  return picked.reshape(index.shape + items.shape[2:])


def unstack_params(params: dict) -> dict:
  """Params in the layout of VLM(layer_list=True): the LLM's layers one subtree each."""
  return dict(params, llm=unstack_layers(params["llm"]))


class VLM(nn.Module):
  cfg: ml_collections.ConfigDict  # config.model
  image_token_id: int
  # uint8 images are scaled to [0, 1] and normalised with these (config.data.image_mean/std);
  # float images come normalised.
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  layer_list: bool = False  # decoding: params from unstack_params (LLM.layer_list)

  def setup(self):
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    compute = Compute.of(c)
    self.vision = ViT(c.vision, dtype, compute)
    self.bridge = bridge_lib.make_bridge(c.bridge, c.llm.width, dtype)
    self.llm = LLM(c.llm, dtype, compute, self.layer_list)
    if c.fusion == "cross_attention":
      self.xattn = [
        fusion_lib.GatedCrossAttention(fusion_lib.block_config(c), c.llm.width, dtype)
        for _ in fusion_lib.block_layers(c)
      ]
    if c.anyres.enabled:  # LLaVA-NeXT's row end marker, randn / sqrt(width) as there
      self.image_newline = self.param(
        "image_newline", logical(nn.initializers.normal(1 / math.sqrt(c.llm.width)), ("embed",)), (c.llm.width,)
      )

  def pixels(self, images: jax.Array) -> jax.Array:
    return vit_lib.normalize_pixels(images, self.image_mean, self.image_std)

  def visual(self, images: jax.Array) -> jax.Array:
    """Images [M, H, W, 3] -> the bridge's tokens [M, visual_tokens, llm_width]."""
    return self.bridge(self.vision(self.pixels(images)))

  def encode_images(self, images: "jax.Array | dict") -> jax.Array:
    """images [B, N, H, W, 3] (uint8 or normalised float) -> visual tokens [B, N * image_tokens,
    llm_width]; pooled images: encode_pool; AnyRes: encode_tiles."""
    if self.cfg.anyres.enabled:
      return self.encode_tiles(images)
    if isinstance(images, dict):
      return self.encode_pool(images)
    media = self.encode_media(images)
    return media.reshape(media.shape[0], -1, media.shape[-1])

  def encode_pool(self, images: dict) -> jax.Array:
    """Pooled images (data.image_pool): {"pool" [G, P, H, W, 3], "index" [B, V]} -> visual
    tokens [B, V, D]. Only the pool goes through the ViT; token v of a row is feature index[v]
    of its group's [P * image_tokens] features (data/packing.py ImagePool)."""
    feats = self._pool_visual(images["pool"])
    return pool_gather(feats.reshape(feats.shape[0], -1, feats.shape[-1]), images["index"])

  def _pool_visual(self, pool: jax.Array) -> jax.Array:
    """Pooled images [G, P, H, W, 3] -> their tokens [G, P, visual_tokens, D]."""
    feats = self.visual(pool.reshape((-1,) + pool.shape[2:]))
    return feats.reshape(pool.shape[:2] + feats.shape[1:])

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
    feats = self.visual(tiles.reshape((g * tg,) + tiles.shape[2:]))
    d = feats.shape[-1]
    newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (g, 1, d))
    pool = jnp.concatenate([newline, feats.reshape(g, -1, d)], axis=1)
    gathered = jnp.take_along_axis(pool, index.reshape(g, -1, 1), axis=1).reshape(b, v, k, d)
    return jnp.einsum("bvkd,bvk->bvd", gathered, weight.astype(gathered.dtype))

  def encode_media(self, images: "jax.Array | dict") -> jax.Array:
    """Images [B, N, H, W, 3], or pooled ones (data.image_pool: row b's v-th image is pool image
    index[b, v] of its group) -> each image's tokens [B, N, L, D]: what cross-attention fusion
    reads (encode_images lays them into the sequence)."""
    if isinstance(images, dict):
      return pool_gather(self._pool_visual(images["pool"]), images["index"])
    feats = self.visual(images.reshape((-1,) + images.shape[2:]))
    return feats.reshape(images.shape[:2] + feats.shape[1:])

  def embed(self, tokens: jax.Array, images: jax.Array) -> jax.Array:
    """Token embeddings with the visual tokens written into the placeholder slots."""
    embeds = self.llm.embed(tokens)
    return scatter_visual(embeds, self.encode_images(images), tokens == self.image_token_id)

  def _inputs(self, tokens: jax.Array, images, segment_ids: jax.Array | None = None):
    """(the LLM's input embeddings, what runs between its layers): the sequence with the visual
    tokens in it; or, cross-attention fusion, the text alone and the blocks reading the images."""
    if self.cfg.fusion == "tokens":
      return self.embed(tokens, images), None
    return self.llm.embed(tokens), self._inserts(*self._media(tokens, images, segment_ids))

  def _media(self, tokens: jax.Array, images, segment_ids: jax.Array | None = None):
    """Cross-attention fusion: (each block's media keys and values, each token's image
    (fusion.media_ids), each media token's image (fusion.key_ids))."""
    media = self.encode_media(images)
    b, n, per_image, width = media.shape
    kvs = tuple(block.media_kv(media.reshape(b, n * per_image, width)) for block in self.xattn)
    return kvs, fusion_lib.media_ids(tokens, self.image_token_id, segment_ids), fusion_lib.key_ids(n, per_image, b)

  def _inserts(self, kvs, query_media: jax.Array, key_media: jax.Array) -> dict:
    return {
      layer: functools.partial(block, kv=kv, query_media=query_media, key_media=key_media)
      for layer, block, kv in zip(fusion_lib.block_layers(self.cfg), self.xattn, kvs)
    }

  def prefill(self, tokens: jax.Array, images: "jax.Array | dict", cache: dict) -> tuple[jax.Array, dict]:
    """Left-padded prompts [B, T] with their images -> (logits of the last token, the cache).
    Cross-attention fusion keeps in the cache each block's media keys and values, the media
    tokens' images and each row's latest image (which the tokens it decodes read)."""
    if self.cfg.fusion == "tokens":
      return self.llm.extend(self.embed(tokens, images), cache)
    kvs, query_media, key_media = self._media(tokens, images)
    cache = dict(cache, media_kv=kvs, media_keys=key_media, media=query_media[:, -1])
    return self.llm.extend(self.llm.embed(tokens), cache, self._inserts(kvs, query_media, key_media))

  def extend(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Next tokens [B, T] (decode: T = 1) -> (logits of the last one [B, vocab], the cache)."""
    if self.cfg.fusion == "tokens":
      return self.llm.extend(self.llm.embed(tokens), cache)
    # A generated <image> moves on to the row's next image slot, as media_ids reads a sequence.
    query_media = cache["media"][:, None] + jnp.cumsum(tokens == self.image_token_id, axis=1, dtype=jnp.int32)
    logits, cache = self.llm.extend(
      self.llm.embed(tokens), cache, self._inserts(cache["media_kv"], query_media, cache["media_keys"])
    )
    return logits, dict(cache, media=query_media[:, -1])

  def loss(
    self,
    tokens: jax.Array,
    images: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
  ) -> tuple[jax.Array, jax.Array]:
    """-> (summed fp32 next-token loss over the supervised targets, their count)."""
    x, inserts = self._inputs(tokens, images, segment_ids)
    return self.llm.loss(x, positions, segment_ids, targets, loss_mask, inserts)

  def __call__(self, tokens: jax.Array, images: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """-> fp32 logits [B, L, vocab]."""
    x, inserts = self._inputs(tokens, images, segment_ids)
    return self.llm(x, positions, segment_ids, inserts)
