"""Two-tower contrastive model (CLIP, SigLIP): a ViT and a text transformer, each pooled and
projected to a shared embedding, trained with vlm_jax.losses on image-caption pairs.

The ViT is the VLM's (models/vit.py, same params), so a trained encoder is the VLM's vision tower
as it is (config.model.vision.init_from). A family fixes the architecture choices that
transformers' CLIPModel and SiglipModel make, so their checkpoints map one to one
(convert/contrastive.py):
- siglip: no CLS; the image is pooled by a learned-probe attention head (big_vision's MAP head)
  and not projected; the text tower is bidirectional, reads its last position and ends in a
  Dense with bias; sigmoid loss with a learned bias.
- clip: a CLS token, pooled and projected (no bias); the text tower is causal and reads the
  first end-of-text token (or, as the original checkpoints with eos id 2, the highest id), then
  projects (no bias); softmax loss.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import losses
from vlm_jax.config import check_one_of
from vlm_jax.errors import UserError
from vlm_jax.models import vit as vit_lib
from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, Compute, constrain, dense, layer_norm, logical, LayerStack


@dataclasses.dataclass(frozen=True)
class Family:
  vision_flavour: str  # vit.FLAVOURS
  image_pool: str  # "map" (attention-pooling head) | "cls"
  image_projection: bool  # a Dense (no bias) from the vision width to the embedding
  text_causal: bool
  text_pool: str  # TEXT_POOLS
  text_head_bias: bool
  loss: str  # LOSSES
  logit_scale: float  # init of the log temperature (and the bias, sigmoid loss only)
  logit_bias: float = 0.0


FAMILIES = {
  "siglip": Family("siglip", "map", False, False, "last", True, "siglip", math.log(10.0), -10.0),
  "clip": Family("clip", "cls", True, True, "eos", False, "clip", math.log(1 / 0.07)),
}
LOSSES = ("siglip", "clip")
# Which text position the embedding reads: the last (SigLIP pads to a fixed length and reads it),
# the first end-of-text token (CLIP), or the highest token id (the original CLIP checkpoints,
# whose end-of-text is the last id of the vocabulary).
TEXT_POOLS = ("last", "eos", "argmax")


def family(model_cfg: ml_collections.ConfigDict) -> Family:
  return FAMILIES[model_cfg.contrastive.family]


def loss_kind(model_cfg: ml_collections.ConfigDict) -> str:
  return model_cfg.contrastive.loss or family(model_cfg).loss


def text_pool(model_cfg: ml_collections.ConfigDict) -> str:
  return model_cfg.text.pool or family(model_cfg).text_pool


def embed_dim(model_cfg: ml_collections.ConfigDict) -> int:
  return model_cfg.contrastive.embed_dim or model_cfg.vision.width


def check_config(model_cfg: ml_collections.ConfigDict) -> None:
  """The contrastive task's model fields, one line naming the field."""
  m = model_cfg
  check_one_of("config.model.contrastive.family", m.contrastive.family, FAMILIES)
  f = family(m)
  if m.contrastive.loss:
    check_one_of("config.model.contrastive.loss", m.contrastive.loss, LOSSES)
  if m.text.pool:
    check_one_of("config.model.text.pool", m.text.pool, TEXT_POOLS)
  if m.text.act:
    check_one_of("config.model.text.act", m.text.act, ACTIVATIONS)
  if m.vision.flavour != f.vision_flavour:
    raise UserError(
      f"config.model.vision.flavour: the {m.contrastive.family} family's tower is "
      f"{f.vision_flavour!r}, not {m.vision.flavour!r}"
    )
  if f.image_pool == "cls" and not m.vision.keep_cls:
    raise UserError(f"config.model.vision.keep_cls: the {m.contrastive.family} family pools the CLS token; set it True")
  if not f.image_projection and embed_dim(m) != m.vision.width:
    raise UserError(
      f"config.model.contrastive.embed_dim: the {m.contrastive.family} family does not project the "
      f"image embedding, so it is the vision width ({m.vision.width}), not {m.contrastive.embed_dim}"
    )
  if m.text.width % m.text.heads:
    raise UserError(f"config.model.text.width ({m.text.width}) must be a multiple of heads ({m.text.heads})")
  if m.anyres.enabled:
    raise UserError("config.model.anyres: the contrastive task reads one square image a pair; set enabled False")


def block_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The text tower's fields as vit.EncoderBlock reads them (its activation: the family's)."""
  t, f = model_cfg.text, family(model_cfg)
  return ml_collections.ConfigDict(
    dict(
      width=t.width,
      heads=t.heads,
      mlp_dim=t.mlp_dim,
      norm_eps=t.norm_eps,
      act=t.act or vit_lib.FLAVOURS[f.vision_flavour]["act"],
      flavour=f.vision_flavour,
    )
  )


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's MAPHead, transformers' SiglipMultiheadAttentionPoolingHead):
  a learned probe attends to the tokens, then a residual MLP on its LayerNorm."""

  cfg: ml_collections.ConfigDict  # config.model.vision
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    head_dim = c.width // c.heads
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, "embed")), (1, c.width))
    probe = jnp.broadcast_to(probe.astype(dt)[None], (x.shape[0], 1, c.width))
    q = dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name="q", dtype=dt, use_bias=True)(probe)
    k, v = [
      dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name=n, dtype=dt, use_bias=True)(x) for n in ("k", "v")
    ]
    o = attention(q, k, v, causal=False)  # one query: the reference path
    h = dense(c.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2, use_bias=True, bias_axes=("embed",))(
      o
    )
    y = layer_norm("norm", c.norm_eps, dt)(h)
    act = ACTIVATIONS[c.act or vit_lib.FLAVOURS[c.flavour]["act"]]
    y = dense(c.width, ("mlp", "embed"), name="fc2", dtype=dt, use_bias=True)(
      act(dense(c.mlp_dim, ("embed", "mlp"), name="fc1", dtype=dt, use_bias=True)(y))
    )
    return (h + y)[:, 0]


class TextEncoder(nn.Module):
  """Token and learned position embeddings, `depth` encoder blocks (the ViT's), a final
  LayerNorm, one position read (TEXT_POOLS), a Dense to the embedding."""

  model_cfg: ml_collections.ConfigDict  # config.model
  dtype: jnp.dtype
  compute: Compute

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> [B, embed_dim] (not normalised)."""
    m, dt = self.model_cfg, self.dtype
    t, f = m.text, family(m)
    x = nn.Embed(
      t.vocab_size,
      t.width,
      dtype=dt,
      param_dtype=jnp.float32,
      name="embed",
      embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
    )(tokens)
    pos = self.param("pos_embed", logical(nn.initializers.normal(0.01), (None, "embed")), (t.max_len, t.width))
    x = constrain(x + pos[: tokens.shape[1]].astype(dt), ("act_batch", "act_length", "act_embed"))
    x, _ = LayerStack(
      vit_lib.EncoderBlock,
      t.depth,
      self.compute,
      fields=dict(cfg=block_config(m), dtype=dt, causal=f.text_causal),
      name="layers",
    )(x)
    x = layer_norm("final_norm", t.norm_eps, dt)(x)
    pool = text_pool(m)
    if pool == "last":
      pooled = x[:, -1]
    else:
      # eos: the first end-of-text token (argmax of a boolean is its first True); argmax: the highest id.
      index = jnp.argmax(tokens == t.eos_id if pool == "eos" else tokens, axis=1)
      pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    return dense(embed_dim(m), ("embed", None), name="head", dtype=dt, use_bias=f.text_head_bias)(pooled)


def normalize(x: jax.Array) -> jax.Array:
  """L2-normalised fp32 rows."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class Contrastive(nn.Module):
  """Params: vision (the ViT), image_head (MAP pooling, siglip), image_projection (clip), text,
  logit_scale, logit_bias (sigmoid loss)."""

  cfg: ml_collections.ConfigDict  # config.model
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

  def setup(self):
    c, f = self.cfg, family(self.cfg)
    dtype, compute = jnp.dtype(c.dtype), Compute.of(c)
    self.vision = vit_lib.ViT(c.vision, dtype, compute)
    if f.image_pool == "map":
      self.image_head = MAPHead(c.vision, dtype)
    if f.image_projection:
      self.image_projection = dense(embed_dim(c), ("embed", None), name="image_projection", dtype=dtype)
    self.text = TextEncoder(c, dtype, compute)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(f.logit_scale), ())
    if loss_kind(c) == "siglip":
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(f.logit_bias), ())

  def image_features(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] (uint8 or normalised float) -> [B, embed_dim], not normalised
    (transformers' get_image_features)."""
    x = self.vision(vit_lib.normalize_pixels(images, self.image_mean, self.image_std))
    x = self.image_head(x) if family(self.cfg).image_pool == "map" else x[:, 0]
    return self.image_projection(x) if family(self.cfg).image_projection else x

  def text_features(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> [B, embed_dim], not normalised (get_text_features)."""
    return self.text(tokens)

  def embed(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> L2-normalised fp32 image and text embeddings [B, embed_dim]."""
    return normalize(self.image_features(images)), normalize(self.text_features(tokens))

  def loss(self, images: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (the loss over the global batch times its size, the size): the train step divides the
    sum by the count, so the step's loss is the global-batch loss itself."""
    image_emb, text_emb = self.embed(images, text)
    if loss_kind(self.cfg) == "siglip":
      value = losses.siglip_loss(image_emb, text_emb, self.logit_scale, self.logit_bias)
    else:
      value = losses.clip_loss(image_emb, text_emb, self.logit_scale)
    rows = jnp.asarray(images.shape[0], jnp.float32)
    return value * rows, rows

  def __call__(self, images: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.embed(images, text)
