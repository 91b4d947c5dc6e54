"""Bridges from vision features to LLM embeddings: linear, mlp2x_gelu, Perceiver resampler."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, constrain, dense, layer_norm, logical


def num_output_tokens(cfg: ml_collections.ConfigDict, num_inputs: int) -> int:
  return cfg.num_latents if cfg.kind == "perceiver" else num_inputs


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


class Bridge(nn.Module):
  """features [B, T, vision_width] -> visual tokens [B, T', llm_width]."""
  cfg: ml_collections.ConfigDict
  out_width: int
  dtype: jnp.dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt, w = self.cfg, self.dtype, self.out_width
    if c.kind == "linear":
      x = dense(w, ("embed", "mlp"), name="linear_1", dtype=dt, use_bias=True)(x)
    elif c.kind == "mlp2x_gelu":
      x = dense(w, ("embed", "mlp"), name="linear_1", dtype=dt, use_bias=True)(x)
      x = dense(w, ("mlp", "embed"), name="linear_2", dtype=dt, use_bias=True)(ACTIVATIONS["gelu"](x))
    elif c.kind == "perceiver":
      x = dense(w, ("embed", "mlp"), name="input_proj", dtype=dt, use_bias=True)(x)
      latents = self.param("latents", logical(nn.initializers.normal(0.02), (None, "embed")),
                           (c.num_latents, w))
      y = jnp.broadcast_to(latents.astype(dt), (x.shape[0],) + latents.shape)
      for i in range(c.depth):
        y = ResamplerBlock(c, w, dt, name=f"block_{i}")(y, x)
      x = layer_norm("out_norm", 1e-5, dt)(y)
    else:
      raise ValueError(f"config.model.bridge.kind: unknown bridge {c.kind!r}")
    return constrain(x, ("act_batch", "act_length", "act_embed"))
