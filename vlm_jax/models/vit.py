"""ViT encoder, SigLIP flavour (no CLS, tanh GELU) and CLIP flavour (CLS, pre-LN, quick_gelu).

Returns the hidden state after `depth` blocks, as LLaVA reads `hidden_states[feature_layer]`: a
model with N blocks and feature_layer=-2 is built with depth=N-1. `final_norm` adds a LayerNorm at
the end (SigLIP's post_layernorm): off for LLaVA-style use of pretrained towers, on when training
from scratch, where it keeps the visual tokens at the scale of the text embeddings.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, Compute, constrain, dense, layer_norm, logical, stack_layers

FLAVOURS = {"siglip": dict(cls=False, pre_norm=False, act="gelu_tanh"),
            "clip": dict(cls=True, pre_norm=True, act="quick_gelu")}


def num_patches(cfg: ml_collections.ConfigDict) -> int:
  return grid_side(cfg) ** 2


def grid_side(cfg: ml_collections.ConfigDict) -> int:
  """Patches on a side of the (square) patch grid."""
  return cfg.image_size // cfg.patch_size


def num_output_tokens(cfg: ml_collections.ConfigDict) -> int:
  has_cls = FLAVOURS[cfg.flavour]["cls"]
  return num_patches(cfg) + (1 if has_cls and cfg.keep_cls else 0)


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
  visual tokens after 1000 steps (95% with these; README "What the default config reaches").
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
  """Pre-LN transformer block (the ViT's, and the contrastive text tower's: causal for CLIP's)."""
  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype
  compute: Compute
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, self.dtype
    head_dim = c.width // c.heads
    h = layer_norm("attn_norm", c.norm_eps, dt)(x)
    qkv = [dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name=n, dtype=dt, use_bias=True)(h)
           for n in ("q", "k", "v")]
    o = attention(*qkv, causal=self.causal, implementation=self.compute.attention, block=self.compute.attention_block)
    x = x + dense(c.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2,
                  use_bias=True, bias_axes=("embed",))(o)
    h = layer_norm("mlp_norm", c.norm_eps, dt)(x)
    h = ACTIVATIONS[c.act or FLAVOURS[c.flavour]["act"]](
        dense(c.mlp_dim, ("embed", "mlp"), name="fc1", dtype=dt, use_bias=True)(h))
    x = x + dense(c.width, ("mlp", "embed"), name="fc2", dtype=dt, use_bias=True)(h)
    return constrain(x, ("act_batch", "act_length", "act_embed")), None


class ViT(nn.Module):
  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.bfloat16
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] (normalised) -> features [B, num_output_tokens, width]."""
    c, flavour = self.cfg, FLAVOURS[self.cfg.flavour]
    p = c.patch_size
    x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", use_bias=not flavour["cls"],
                dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed",
                kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=logical(nn.initializers.zeros_init(), ("embed",)))(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, c.width)
    if flavour["cls"]:
      cls = self.param("cls", logical(nn.initializers.normal(0.02), ("embed",)), (c.width,))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.width)), x], axis=1)
    pos = self.param("pos_embed", logical(sincos_init(c.image_size // p, flavour["cls"]), (None, "embed")),
                     (x.shape[1], c.width))
    x = x + pos.astype(x.dtype)
    if flavour["pre_norm"]:
      x = layer_norm("pre_norm", c.norm_eps, self.dtype)(x)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    x, _ = stack_layers(EncoderBlock, c.depth, self.compute, cfg=c, dtype=self.dtype,
                        name="layers")(x)
    if c.final_norm:  # SigLIP's post_layernorm; LLaVA reads pretrained towers before it
      x = layer_norm("final_norm", c.norm_eps, self.dtype)(x)
    if flavour["cls"] and not c.keep_cls:
      x = x[:, 1:]
    return x
