"""Bridges from vision features to LLM embeddings, one registry entry per `config.model.bridge.kind`.

A bridge maps features [B, T, vision_width] to visual tokens [B, T', llm_width]. Adding a kind
is one module and one BRIDGES entry (how many tokens it yields, whether it keeps the patch grid).
"""

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.config import check_one_of
from vlm_jax.errors import UserError
from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, constrain, dense, layer_norm, logical


class ResamplerBlock(nn.Module):
  """Latents cross-attend to [inputs; latents] (Flamingo), then a GELU MLP; pre-LN, residual."""

  cfg: ml_collections.ConfigDict
  width: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, latents, inputs):
    c, dt = self.cfg, self.dtype
    head_dim = self.width // c.heads
    q_in = layer_norm("latent_norm", 1e-5, dt)(latents)
    kv_in = jnp.concatenate([layer_norm("input_norm", 1e-5, dt)(inputs), q_in], axis=1)
    q = dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name="q", dtype=dt)(q_in)
    k = dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name="k", dtype=dt)(kv_in)
    v = dense((c.heads, head_dim), ("embed", "heads", "head_dim"), name="v", dtype=dt)(kv_in)
    o = attention(q, k, v, causal=False)
    # Constrained: left to propagation, a (2,2,2) mesh gave wrong sums here (XLA CPU, jax 0.10.2;
    # the residual's width and batch both on fsdp).
    latents = _tokens(latents + dense(self.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2)(o))
    h = layer_norm("mlp_norm", 1e-5, dt)(latents)
    h = ACTIVATIONS["gelu"](dense(4 * self.width, ("embed", "mlp"), name="fc1", dtype=dt)(h))
    return _tokens(latents + dense(self.width, ("mlp", "embed"), name="fc2", dtype=dt)(h))


def _tokens(x: jax.Array) -> jax.Array:
  return constrain(x, ("act_batch", "act_length", "act_embed"))


class _BridgeModule(nn.Module):
  """What every bridge is built from: config.model.bridge, the LLM width, the compute dtype."""

  cfg: ml_collections.ConfigDict
  out_width: int
  dtype: jnp.dtype = jnp.bfloat16


class Linear(_BridgeModule):
  """One projection per patch (LLaVA-1)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _tokens(dense(self.out_width, ("embed", "mlp"), name="linear_1", dtype=self.dtype, use_bias=True)(x))


class MLP2xGELU(_BridgeModule):
  """Two projections with a GELU between, per patch (LLaVA-1.5's projector)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt, w = self.dtype, self.out_width
    x = dense(w, ("embed", "mlp"), name="linear_1", dtype=dt, use_bias=True)(x)
    return _tokens(dense(w, ("mlp", "embed"), name="linear_2", dtype=dt, use_bias=True)(ACTIVATIONS["gelu"](x)))


class Perceiver(_BridgeModule):
  """num_latents learned queries resample the features (Flamingo): a fixed token budget."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt, w = self.cfg, self.dtype, self.out_width
    x = _tokens(dense(w, ("embed", "mlp"), name="input_proj", dtype=dt, use_bias=True)(x))
    latents = self.param("latents", logical(nn.initializers.normal(0.02), (None, "embed")), (c.num_latents, w))
    y = jnp.broadcast_to(latents.astype(dt), (x.shape[0],) + latents.shape)
    for i in range(c.depth):
      y = ResamplerBlock(c, w, dt, name=f"block_{i}")(y, x)
    return _tokens(layer_norm("out_norm", 1e-5, dt)(y))


class QFormerLayer(nn.Module):
  """One BLIP-2 Q-Former layer on the queries (post-LN, BERT style): self-attention, then
  (every cross_attention_every-th layer, from the first) cross-attention to the image features,
  then an erf-GELU MLP; each sub-block is LayerNorm(x + f(x)). Names follow transformers'."""

  cfg: ml_collections.ConfigDict
  width: int
  cross: bool
  dtype: jnp.dtype

  def _attend(self, name: str, q_in: jax.Array, kv_in: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    shape, axes = (c.heads, self.width // c.heads), ("embed", "heads", "head_dim")
    q, k, v = (
      dense(shape, axes, name=f"{name}_{p}", dtype=dt, use_bias=True)(x)
      for p, x in (("q", q_in), ("k", kv_in), ("v", kv_in))
    )
    o = dense(self.width, ("heads", "head_dim", "embed"), name=f"{name}_o", dtype=dt, n_in=2, use_bias=True)(
      attention(q, k, v, causal=False)
    )
    return layer_norm(f"{name}_norm", self.cfg.norm_eps, dt)(q_in + o)

  @nn.compact
  def __call__(self, queries: jax.Array, features: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    x = self._attend("self", queries, queries)
    if self.cross:
      x = self._attend("cross", x, features)
    h = ACTIVATIONS["gelu"](
      dense(c.mlp_dim or 4 * self.width, ("embed", "mlp"), name="fc1", dtype=dt, use_bias=True)(x)
    )
    h = dense(self.width, ("mlp", "embed"), name="fc2", dtype=dt, use_bias=True)(h)
    return layer_norm("mlp_norm", c.norm_eps, dt)(x + h)


class QFormer(_BridgeModule):
  """BLIP-2's Q-Former: num_queries learned queries, LayerNorm, `depth` QFormerLayers, then a
  projection to the LLM width (BLIP-2's language_projection): a fixed token budget."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    width = c.width or self.out_width
    queries = self.param("query_tokens", logical(nn.initializers.normal(0.02), (None, "embed")), (c.num_queries, width))
    y = layer_norm("query_norm", c.norm_eps, dt)(jnp.broadcast_to(queries, (x.shape[0],) + queries.shape))
    for i in range(c.depth):
      y = QFormerLayer(c, width, i % c.cross_attention_every == 0, dt, name=f"layer_{i}")(y, x)
    return _tokens(dense(self.out_width, ("embed", "mlp"), name="out_proj", dtype=dt, use_bias=True)(y))


def _grid(x: jax.Array) -> jax.Array:
  """[B, S*S, D] -> [B, S, S, D] (row-major patches)."""
  side = math.isqrt(x.shape[1])
  return x.reshape(x.shape[0], side, side, x.shape[2])


def _channel_norm(name: str, dtype: jnp.dtype) -> nn.LayerNorm:
  return layer_norm(name, 1e-6, dtype)  # timm's LayerNorm2d: over channels, eps 1e-6


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] averaging weights of torch's AdaptiveAvgPool along one axis: output i is the
  mean of inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1 (windows overlap
  when n_out does not divide n_in)."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, side: int) -> jax.Array:
  """[B, H, W, D] -> [B, side, side, D], as torch.nn.AdaptiveAvgPool2d((side, side))."""
  rows = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], side), x.dtype)
  cols = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], side), x.dtype)
  return jnp.einsum("ih,bhwd,jw->bijd", rows, x, cols)


class ResBlock(nn.Module):
  """Honeybee's RegNet bottleneck (timm RegStage, bottle_ratio 1, group size 1): 1x1 conv,
  depthwise 3x3 conv, squeeze-excite (a quarter of the input channels), 1x1 conv; LayerNorm over
  channels after each conv, SiLU; residual (through a 1x1 conv + norm when the width changes)."""

  width: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
    dt, w, act = self.dtype, self.width, jax.nn.silu
    shortcut = x
    if x.shape[-1] != w:
      shortcut = _channel_norm("down_norm", dt)(dense(w, ("embed", "mlp"), name="down", dtype=dt)(x))
    h = act(_channel_norm("norm1", dt)(dense(w, ("embed", "mlp"), name="conv1", dtype=dt)(x)))
    h = nn.Conv(
      w,
      (3, 3),
      padding="SAME",
      feature_group_count=w,
      use_bias=False,
      dtype=dt,
      param_dtype=jnp.float32,
      name="conv2",
      kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "mlp")),
    )(h)
    h = act(_channel_norm("norm2", dt)(h))
    squeeze = max(1, round(x.shape[-1] * 0.25))
    gate = act(dense(squeeze, ("mlp", None), name="se_fc1", dtype=dt, use_bias=True)(h.mean((1, 2), keepdims=True)))
    h = h * jax.nn.sigmoid(dense(w, (None, "mlp"), name="se_fc2", dtype=dt, use_bias=True)(gate))
    h = _channel_norm("norm3", dt)(dense(w, ("mlp", "embed"), name="conv3", dtype=dt)(h))
    return act(h + shortcut)


class CAbstractor(_BridgeModule):
  """Honeybee's C-Abstractor: a learned position embedding on the features, `depth` ResBlocks,
  adaptive average pooling of the patch grid to num_tokens (a square), `depth` ResBlocks, then a
  two-layer SiLU MLP to the LLM width: fewer tokens, each still a neighbourhood of the image."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    width = c.width or self.out_width
    pos = self.param(
      "pos_embed", logical(nn.initializers.truncated_normal(0.02), (None, "embed")), x.shape[1:], jnp.float32
    )
    h = _grid(x + pos.astype(x.dtype))
    for i in range(c.depth):
      h = ResBlock(width, dt, name=f"block1_{i}")(h)
    h = adaptive_avg_pool(h, math.isqrt(c.num_tokens))
    for i in range(c.depth):
      h = ResBlock(width, dt, name=f"block2_{i}")(h)
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    h = jax.nn.silu(dense(self.out_width, ("embed", "mlp"), name="readout_1", dtype=dt, use_bias=True)(h))
    return _tokens(dense(self.out_width, ("mlp", "embed"), name="readout_2", dtype=dt, use_bias=True)(h))


PIXEL_SHUFFLE_PROJECTIONS = ("linear", "mlp")


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
  """Space-to-depth: [B, S*S, D] -> [B, (S/r)^2, r*r*D]; token (i, j) holds patches (r*i + dy,
  r*j + dx) in (dy, dx) order, as Idefics3's pixel_shuffle."""
  b, d = x.shape[0], x.shape[-1]
  s, r = math.isqrt(x.shape[1]), factor
  x = x.reshape(b, s // r, r, s // r, r, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (s // r) ** 2, r * r * d)


class PixelShuffle(_BridgeModule):
  """r x r neighbouring patches concatenated into one token, then a projection (Idefics3,
  nanoVLM: linear without bias) or an MLP (mlp2x_gelu's): r^2 times fewer tokens."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt, w = self.dtype, self.out_width
    x = pixel_shuffle(x, self.cfg.factor)
    if self.cfg.projection == "linear":
      return _tokens(dense(w, ("embed", "mlp"), name="linear_1", dtype=dt)(x))
    x = ACTIVATIONS["gelu"](dense(w, ("embed", "mlp"), name="linear_1", dtype=dt, use_bias=True)(x))
    return _tokens(dense(w, ("mlp", "embed"), name="linear_2", dtype=dt, use_bias=True)(x))


@dataclasses.dataclass(frozen=True)
class BridgeKind:
  """A bridge: its module (config.model.bridge, LLM width, dtype) and its token layout.

  Grid bridges yield a square grid of tokens per image, `side(cfg, patch grid side)` on a side,
  in row-major order (AnyRes tiles read that grid); `per_patch` ones keep one token per ViT
  output token (a CLS token included). Set bridges (`side` None) yield `queries(cfg)` tokens.
  `check(config.model, patch grid side)` raises a UserError for fields that cannot work.
  """

  module: Callable[..., nn.Module]
  side: Callable[[ml_collections.ConfigDict, int], int] | None
  queries: Callable[[ml_collections.ConfigDict], int] | None = None
  per_patch: bool = False
  check: Callable[[ml_collections.ConfigDict, int], None] = lambda model_cfg, side: None


def _check_positive(cfg: ml_collections.ConfigDict, *fields: str) -> None:
  for f in fields:
    if cfg[f] < 1:
      raise UserError(f"config.model.bridge.{f} must be >= 1 for the {cfg.kind} bridge, got {cfg[f]}")


def _check_qformer(model_cfg: ml_collections.ConfigDict, side: int) -> None:
  cfg = model_cfg.bridge
  _check_positive(cfg, "num_queries", "depth", "heads", "cross_attention_every")
  width, field = (cfg.width, "bridge.width") if cfg.width else (model_cfg.llm.width, "llm.width (bridge.width=0)")
  if width % cfg.heads:
    raise UserError(f"config.model.{field}: {width} is not a multiple of config.model.bridge.heads ({cfg.heads})")


def _check_perceiver(model_cfg: ml_collections.ConfigDict, side: int) -> None:
  _check_positive(model_cfg.bridge, "num_latents", "depth", "heads")
  if model_cfg.llm.width % model_cfg.bridge.heads:
    raise UserError(
      f"config.model.llm.width ({model_cfg.llm.width}) is not a multiple of config.model.bridge.heads "
      f"({model_cfg.bridge.heads}), the perceiver's heads"
    )


def _check_cabstractor(model_cfg: ml_collections.ConfigDict, side: int) -> None:
  cfg = model_cfg.bridge
  _check_positive(cfg, "num_tokens", "depth")
  if math.isqrt(cfg.num_tokens) ** 2 != cfg.num_tokens:
    raise UserError(f"config.model.bridge.num_tokens ({cfg.num_tokens}) must be a square (the pooled grid)")
  if math.isqrt(cfg.num_tokens) > side:
    raise UserError(
      f"config.model.bridge.num_tokens ({cfg.num_tokens}) pools the {side}x{side} patch grid "
      f"to a larger one ({math.isqrt(cfg.num_tokens)}x{math.isqrt(cfg.num_tokens)})"
    )


def _check_pixel_shuffle(model_cfg: ml_collections.ConfigDict, side: int) -> None:
  cfg = model_cfg.bridge
  _check_positive(cfg, "factor")
  if side % cfg.factor:
    raise UserError(
      f"config.model.bridge.factor ({cfg.factor}) does not divide the ViT's {side}x{side} patch "
      "grid (model.vision.image_size / patch_size)"
    )
  check_one_of("config.model.bridge.projection", cfg.projection, PIXEL_SHUFFLE_PROJECTIONS)


BRIDGES = {
  "linear": BridgeKind(Linear, lambda cfg, side: side, per_patch=True),
  "mlp2x_gelu": BridgeKind(MLP2xGELU, lambda cfg, side: side, per_patch=True),
  "perceiver": BridgeKind(Perceiver, None, queries=lambda cfg: cfg.num_latents, check=_check_perceiver),
  "qformer": BridgeKind(QFormer, None, queries=lambda cfg: cfg.num_queries, check=_check_qformer),
  "cabstractor": BridgeKind(CAbstractor, lambda cfg, side: math.isqrt(cfg.num_tokens), check=_check_cabstractor),
  "pixel_shuffle": BridgeKind(PixelShuffle, lambda cfg, side: side // cfg.factor, check=_check_pixel_shuffle),
}


def kind_of(cfg: ml_collections.ConfigDict) -> BridgeKind:
  """The registry entry of config.model.bridge; an unknown kind is a config error."""
  if cfg.kind not in BRIDGES:
    raise UserError(f"config.model.bridge.kind: {cfg.kind!r} is not one of {', '.join(BRIDGES)}")
  return BRIDGES[cfg.kind]


def make_bridge(cfg: ml_collections.ConfigDict, out_width: int, dtype: jnp.dtype = jnp.bfloat16) -> nn.Module:
  return kind_of(cfg).module(cfg, out_width, dtype)


def num_output_tokens(cfg: ml_collections.ConfigDict, num_inputs: int, side: int) -> int:
  """Visual tokens of one image from the ViT's num_inputs output tokens on a side x side grid."""
  kind = kind_of(cfg)
  if kind.side is None:
    return kind.queries(cfg)
  return num_inputs if kind.per_patch else kind.side(cfg, side) ** 2
