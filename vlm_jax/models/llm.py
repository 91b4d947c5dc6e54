"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU (+ Qwen2 QKV bias)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.attention import attention
from vlm_jax.models.layers import RMSNorm, constrain, dense, logical, stack_layers


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF Llama layout (rotate halves), computed in fp32. x [B,T,N,H]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1]))
  angles = positions[..., None].astype(jnp.float32) * inv_freq          # [B,T,H/2]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class DecoderBlock(nn.Module):
  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype
  attention_impl: str

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    c, dt = self.cfg, self.dtype
    h = RMSNorm(c.norm_eps, dt, name="attn_norm")(x)
    q = dense((c.heads, c.head_dim), ("embed", "heads", "head_dim"), name="q", dtype=dt,
              use_bias=c.qkv_bias)(h)
    k = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k", dtype=dt,
              use_bias=c.qkv_bias)(h)
    v = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v", dtype=dt,
              use_bias=c.qkv_bias)(h)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    o = attention(q, k, v, q_segment_ids=segment_ids, causal=True, implementation=self.attention_impl)
    x = x + dense(c.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2)(o)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    h = RMSNorm(c.norm_eps, dt, name="mlp_norm")(x)
    gate = dense(c.mlp_dim, ("embed", "mlp"), name="gate", dtype=dt)(h)
    up = dense(c.mlp_dim, ("embed", "mlp"), name="up", dtype=dt)(h)
    h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
    x = x + dense(c.width, ("mlp", "embed"), name="down", dtype=dt)(h)
    return constrain(x, ("act_batch", "act_length", "act_embed")), None


class LLM(nn.Module):
  """Decoder LLM. `embed` maps ids to vectors; `__call__` maps vectors to fp32 logits."""
  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.bfloat16
  remat: str = "none"
  attention_impl: str = "xla"

  def setup(self):
    c = self.cfg
    self.embedder = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=jnp.float32,
                             # std 1 (as MaxText): token identity must not be drowned by the O(1) outputs
                             # of the first layers and the visual tokens in the residual stream.
                             embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")))
    self.layers = stack_layers(DecoderBlock, c.depth, self.remat, n_broadcast=2, cfg=c,
                               dtype=self.dtype, attention_impl=self.attention_impl)
    self.final_norm = RMSNorm(c.norm_eps, self.dtype)
    if not c.tie_embeddings:
      self.lm_head = self.param("lm_head", logical(nn.initializers.lecun_normal(), ("embed", "vocab")),
                                (c.width, c.vocab_size), jnp.float32)

  def embed(self, tokens: jax.Array) -> jax.Array:
    return constrain(self.embedder(tokens), ("act_batch", "act_length", "act_embed"))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    x, _ = self.layers(x, positions, segment_ids)
    x = self.final_norm(x)
    head = self.embedder.embedding.T if self.cfg.tie_embeddings else self.lm_head
    logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))
