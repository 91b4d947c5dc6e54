"""ViT encoder, SigLIP flavour (no CLS, tanh GELU) and CLIP flavour (CLS, pre-LN, quick_gelu).

Returns the hidden state after `depth` blocks, as LLaVA reads `hidden_states[feature_layer]`: a
model with N blocks and feature_layer=-2 is built with depth=N-1. `final_norm` adds a LayerNorm at
the end (SigLIP's post_layernorm): off for LLaVA-style use of pretrained towers, on when training
from scratch, where it keeps the visual tokens at the scale of the text embeddings.
`token_merging` > 0 merges that many tokens in each block (ToMe, token_merging.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import token_merging
from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, Compute, LayerStack, constrain, dense, layer_norm, logical

FLAVOURS = {
  "siglip": dict(cls=False, pre_norm=False, act="gelu_tanh"),
  "clip": dict(cls=True, pre_norm=True, act="quick_gelu"),
}


def num_patches(cfg: ml_collections.ConfigDict) -> int:
  return grid_side(cfg) ** 2


def grid_side(cfg: ml_collections.ConfigDict) -> int:
  """Patches on a side of the (square) patch grid."""
  return cfg.image_size // cfg.patch_size


def cls_tokens(cfg: ml_collections.ConfigDict) -> int:
  """1 for a flavour with a CLS token (first in the sequence), else 0."""
  return int(FLAVOURS[cfg.flavour]["cls"])


def num_output_tokens(cfg: ml_collections.ConfigDict) -> int:
  """Tokens per image out of the ViT: the patches (and CLS with keep_cls) less those ToMe merged."""
  cls = cls_tokens(cfg)
  merged = token_merging.counts(num_patches(cfg) + cls, cfg.token_merging, cfg.depth, cls)[-1]
  return merged - (0 if cfg.keep_cls else cls)


def normalize_pixels(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """The ViT's input: uint8 pixels scaled to [0, 1] and normalised with mean and std (as
  data.images.Preprocessing does on the host, the same operations in fp32); float input as it is."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def sincos_init(grid: int, has_cls: bool):
  """Init for the learned position embedding: 2D sin-cos over the patch grid (zeros for CLS).

  O(1) from the start, so position is as visible as patch content; with std-0.02 noise it is
  drowned and must first be learned (slow for spatial questions). Frequencies go from 1 down to
  1 / (2 * grid), not to the usual 1 / 10000 (made for text lengths): over a 4-patch grid half
  of those barely change, and in `shapes` "which side" was then only 78% decodable from the
  visual tokens after 1000 steps (95% with these; docs/performance.md "What the default config reaches").
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    width = shape[-1]
    quarter = width // 4
    omega = 1.0 / (2 * grid) ** (jnp.arange(quarter) / max(quarter - 1, 1))
    y, x = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
    angles = [y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega]
    emb = jnp.concatenate([f(a) for a in angles for f in (jnp.sin, jnp.cos)], axis=1)
    emb = jnp.pad(emb, ((1 if has_cls else 0, 0), (0, width - 4 * quarter)))
    return emb.astype(dtype)

  return init


class EncoderBlock(nn.Module):
  """Pre-LN transformer block (the ViT's, and the contrastive text tower's: causal for CLIP's).

  Its carry is x [B, N, D], or (x, size [B, N] fp32) under ToMe (token_merging.py): attention is
  then proportional to the sizes, and `merge` tokens are merged after it.
  """

  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype
  compute: Compute
  causal: bool = False
  merge: int = 0  # ToMe's r: tokens this block merges (with a (x, size) carry)

  @nn.compact
  def __call__(self, carry):
    c, dt = self.cfg, self.dtype
    merging = isinstance(carry, tuple)
    x, size = carry if merging else (carry, None)
    head_dim = c.width // c.heads
    h = layer_norm("attn_norm", c.norm_eps, dt)(x)
    q, k, v = [
      dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name=n, dtype=dt, use_bias=True)(h)
      for n in ("q", "k", "v")
    ]
    if merging:
      o = token_merging.proportional_attention(q, k, v, size)
    else:
      o = attention(
        q, k, v, causal=self.causal, implementation=self.compute.attention, block=self.compute.attention_block
      )
    x = x + dense(
      c.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2, use_bias=True, bias_axes=("embed",)
    )(o)
    if self.merge > 0:  # ToMe's metric: the keys, averaged over heads
      matching = token_merging.bipartite_soft_matching(k.mean(axis=2), self.merge, cls_tokens(c))
      x, size = token_merging.merge_weighted(x, size, matching)
    h = layer_norm("mlp_norm", c.norm_eps, dt)(x)
    h = ACTIVATIONS[c.act or FLAVOURS[c.flavour]["act"]](
      dense(c.mlp_dim, ("embed", "mlp"), name="fc1", dtype=dt, use_bias=True)(h)
    )
    x = x + dense(c.width, ("mlp", "embed"), name="fc2", dtype=dt, use_bias=True)(h)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    return ((x, size) if merging else x), None


class ViT(nn.Module):
  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.bfloat16
  compute: Compute = Compute()
  merging: bool | None = None  # the ToMe loop over blocks; None: when cfg.token_merging > 0 (True: tests)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] (normalised) -> features [B, num_output_tokens, width]."""
    c, flavour = self.cfg, FLAVOURS[self.cfg.flavour]
    p = c.patch_size
    x = nn.Conv(
      c.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=not flavour["cls"],
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="patch_embed",
      kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=logical(nn.initializers.zeros_init(), ("embed",)),
    )(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, c.width)
    if flavour["cls"]:
      cls = self.param("cls", logical(nn.initializers.normal(0.02), ("embed",)), (c.width,))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.width)), x], axis=1)
    pos = self.param(
      "pos_embed", logical(sincos_init(c.image_size // p, flavour["cls"]), (None, "embed")), (x.shape[1], c.width)
    )
    x = x + pos.astype(x.dtype)
    if flavour["pre_norm"]:
      x = layer_norm("pre_norm", c.norm_eps, self.dtype)(x)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    layers = LayerStack(EncoderBlock, c.depth, self.compute, fields=dict(cfg=c, dtype=self.dtype), name="layers")
    if c.token_merging > 0 if self.merging is None else self.merging:
      # One block at a time, each merging its share of tokens (at most half its tokens, by the
      # matching itself: token_merging.counts), with attention proportional to token sizes.
      (x, _), _ = layers((x, jnp.ones(x.shape[:2], jnp.float32)), one_by_one=dict(merge=c.token_merging))
    else:
      x, _ = layers(x)
    if c.final_norm:  # SigLIP's post_layernorm; LLaVA reads pretrained towers before it
      x = layer_norm("final_norm", c.norm_eps, self.dtype)(x)
    if flavour["cls"] and not c.keep_cls:
      x = x[:, 1:]
    return x
