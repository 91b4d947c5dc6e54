"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, gated MLP.

Variants by config: Qwen2's QKV bias, Mistral's sliding window, Gemma's (1 + scale) norms,
sqrt(width) input scale and GELU gate, Llama 3.1's RoPE frequency scaling.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, RMSNorm, constrain, dense, logical, stack_layers


def rope_inv_freq(cfg: ml_collections.ConfigDict) -> jax.Array:
  """[head_dim/2] rotary frequencies, fp32, as HF's ROPE_INIT_FUNCTIONS[cfg.rope_type]."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(d // 2, dtype=jnp.float32) * 2 / d))
  if cfg.rope_type == "linear":
    return inv_freq / cfg.rope_factor
  if cfg.rope_type == "llama3":
    # Llama 3.1+: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    old_len, factor = cfg.rope_original_max_len, cfg.rope_factor
    low_wavelen = old_len / cfg.rope_low_freq_factor
    high_wavelen = old_len / cfg.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the HF Llama layout (rotate halves), computed in fp32. x [B,T,N,H]."""
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
    h = RMSNorm(c.norm_eps, dt, c.norm_offset, name="attn_norm")(x)
    q = dense((c.heads, c.head_dim), ("embed", "heads", "head_dim"), name="q", dtype=dt,
              use_bias=c.qkv_bias)(h)
    k = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k", dtype=dt,
              use_bias=c.qkv_bias)(h)
    v = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v", dtype=dt,
              use_bias=c.qkv_bias)(h)
    inv_freq = rope_inv_freq(c)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    o = attention(q, k, v, q_segment_ids=segment_ids, causal=True, implementation=self.attention_impl,
                  window=c.sliding_window)
    x = x + dense(c.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2)(o)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    h = RMSNorm(c.norm_eps, dt, c.norm_offset, name="mlp_norm")(x)
    gate = dense(c.mlp_dim, ("embed", "mlp"), name="gate", dtype=dt)(h)
    up = dense(c.mlp_dim, ("embed", "mlp"), name="up", dtype=dt)(h)
    h = constrain(ACTIVATIONS[c.mlp_act](gate) * up, ("act_batch", "act_length", "act_mlp"))
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
    self.final_norm = RMSNorm(c.norm_eps, self.dtype, c.norm_offset)
    if not c.tie_embeddings:
      self.lm_head = self.param("lm_head", logical(nn.initializers.lecun_normal(), ("embed", "vocab")),
                                (c.width, c.vocab_size), jnp.float32)

  def embed(self, tokens: jax.Array) -> jax.Array:
    return constrain(self.embedder(tokens), ("act_batch", "act_length", "act_embed"))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    if self.cfg.embed_scale:
      # Gemma scales every input vector, visual tokens included (as HF's Llava over Gemma), by
      # sqrt(width) rounded to the compute dtype.
      x = x * jnp.asarray(self.cfg.width ** 0.5, x.dtype)
    x, _ = self.layers(x, positions, segment_ids)
    x = self.final_norm(x)
    head = self.embedder.embedding.T if self.cfg.tie_embeddings else self.lm_head
    logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))
