"""Bridges from vision features to LLM embeddings, one registry entry per `config.model.bridge.kind`.

A bridge maps features [B, T, vision_width] to visual tokens [B, T', llm_width]. Adding a kind
is one module and one BRIDGES entry (how many tokens it yields, whether it keeps the patch grid).
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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
    latents = latents + dense(self.width, ("heads", "head_dim", "embed"), name="o", dtype=dt,
                              n_in=2)(o)
    h = layer_norm("mlp_norm", 1e-5, dt)(latents)
    h = ACTIVATIONS["gelu"](dense(4 * self.width, ("embed", "mlp"), name="fc1", dtype=dt)(h))
    return latents + dense(self.width, ("mlp", "embed"), name="fc2", dtype=dt)(h)


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
    x = dense(w, ("embed", "mlp"), name="input_proj", dtype=dt, use_bias=True)(x)
    latents = self.param("latents", logical(nn.initializers.normal(0.02), (None, "embed")),
                         (c.num_latents, w))
    y = jnp.broadcast_to(latents.astype(dt), (x.shape[0],) + latents.shape)
    for i in range(c.depth):
      y = ResamplerBlock(c, w, dt, name=f"block_{i}")(y, x)
    return _tokens(layer_norm("out_norm", 1e-5, dt)(y))


@dataclasses.dataclass(frozen=True)
class BridgeKind:
  module: Callable[..., nn.Module]          # (config.model.bridge, out_width, dtype)
  num_tokens: Callable[[ml_collections.ConfigDict, int], int]  # (bridge config, feature tokens) -> visual tokens
  keeps_grid: bool                          # one token per patch, in grid order (AnyRes reads the grid)


def _per_patch(cfg: ml_collections.ConfigDict, num_inputs: int) -> int:
  return num_inputs


BRIDGES = {
    "linear": BridgeKind(Linear, _per_patch, keeps_grid=True),
    "mlp2x_gelu": BridgeKind(MLP2xGELU, _per_patch, keeps_grid=True),
    "perceiver": BridgeKind(Perceiver, lambda cfg, n: cfg.num_latents, keeps_grid=False),
}


def kind_of(cfg: ml_collections.ConfigDict) -> BridgeKind:
  """The registry entry of config.model.bridge; an unknown kind is a config error."""
  if cfg.kind not in BRIDGES:
    raise UserError(f"config.model.bridge.kind: {cfg.kind!r} is not one of {', '.join(BRIDGES)}")
  return BRIDGES[cfg.kind]


def make_bridge(cfg: ml_collections.ConfigDict, out_width: int, dtype: jnp.dtype = jnp.bfloat16) -> nn.Module:
  return kind_of(cfg).module(cfg, out_width, dtype)


def num_output_tokens(cfg: ml_collections.ConfigDict, num_inputs: int) -> int:
  return kind_of(cfg).num_tokens(cfg, num_inputs)
