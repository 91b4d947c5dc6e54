"""Cross-attention fusion (Flamingo): the LLM's sequence stays text, with one `<image>` marker
where each image stands; gated cross-attention blocks between the LLM's layers let each text
token read the bridge's tokens of the latest image at or before it (Flamingo's media masking).

A block is x + tanh(a) * attn(LN(x), media), then x + tanh(f) * MLP(LN(x)), the gates a and f
starting at 0: an untrained block is the identity, so the LLM starts exactly as it was. Names
follow OpenFlamingo's GatedCrossAttentionBlock (only_attend_immediate_media=True).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.errors import UserError
from vlm_jax.models.attention import attention
from vlm_jax.models.layers import ACTIVATIONS, constrain, dense, layer_norm

FUSIONS = ("tokens", "cross_attention")  # config.model.fusion


def check(model_cfg: ml_collections.ConfigDict) -> None:
  """config.model.cross_attention against the LLM it is inserted into."""
  x = model_cfg.cross_attention
  if x.every < 1:
    raise UserError(f"config.model.cross_attention.every must be >= 1, got {x.every}")
  for name in ("heads", "head_dim", "mlp_dim"):
    if x[name] < 0:
      raise UserError(f"config.model.cross_attention.{name} must be >= 0 (0: the LLM's), got {x[name]}")
  if x.every > model_cfg.llm.depth:
    raise UserError(
      f"config.model.cross_attention.every ({x.every}) exceeds the LLM's depth "
      f"({model_cfg.llm.depth}): no layer would get a block"
    )
  if model_cfg.anyres.enabled:
    raise UserError(
      "config.model.fusion: cross_attention reads one view an image; AnyRes tiles are for "
      "fusion=tokens (set config.model.anyres.enabled=False)"
    )


def block_layers(model_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The LLM layers a block runs before: every k-th (k-1, 2k-1, ...), as OpenFlamingo's
  cross_attn_every_n_layers."""
  k = model_cfg.cross_attention.every
  return tuple(i for i in range(model_cfg.llm.depth) if (i + 1) % k == 0)


def media_ids(tokens: jax.Array, image_token_id: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """[B, T] int32: for each token the 1-based row index of the latest image at or before it in
  its own segment (packed rows), 0 where there is none. A row's k-th `<image>` marker is its
  k-th image slot (data/packing.py keeps them in order)."""
  is_image = tokens == image_token_id
  count = jnp.cumsum(is_image, axis=1, dtype=jnp.int32)
  last = jax.lax.cummax(jnp.where(is_image, jnp.arange(tokens.shape[1]), -1), axis=1)
  seen = last >= 0
  if segment_ids is not None:
    seen &= jnp.take_along_axis(segment_ids, jnp.maximum(last, 0), axis=1) == segment_ids
  return jnp.where(seen, count, 0)


def key_ids(images: int, tokens_per_image: int, rows: int) -> jax.Array:
  """[rows, images * tokens_per_image] int32: the 1-based image of each media token."""
  ids = jnp.repeat(jnp.arange(1, images + 1, dtype=jnp.int32), tokens_per_image)
  return jnp.broadcast_to(ids, (rows, ids.shape[0]))


def block_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model.cross_attention with its 0s resolved: the LLM's heads and head_dim, an MLP 4x
  the LLM's width."""
  x, llm = model_cfg.cross_attention, model_cfg.llm
  return ml_collections.ConfigDict(
    dict(
      x.to_dict(), heads=x.heads or llm.heads, head_dim=x.head_dim or llm.head_dim, mlp_dim=x.mlp_dim or 4 * llm.width
    )
  )


class GatedCrossAttention(nn.Module):
  """One gated cross-attention + gated dense block (Flamingo)."""

  cfg: ml_collections.ConfigDict  # block_config(config.model)
  width: int  # the LLM's
  dtype: jnp.dtype = jnp.bfloat16

  def setup(self):
    c, dt = self.cfg, self.dtype
    shape, axes = (c.heads, c.head_dim), ("embed", "heads", "head_dim")
    self.attn_norm = layer_norm("attn_norm", 1e-5, dt)
    self.q, self.k, self.v = (dense(shape, axes, name=name, dtype=dt) for name in ("q", "k", "v"))
    self.o = dense(self.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2)
    self.mlp_norm = layer_norm("mlp_norm", 1e-5, dt)
    self.fc1 = dense(c.mlp_dim, ("embed", "mlp"), name="fc1", dtype=dt)
    self.fc2 = dense(self.width, ("mlp", "embed"), name="fc2", dtype=dt)
    gate = lambda name: self.param(name, nn.initializers.zeros_init(), (), jnp.float32)
    self.attn_gate, self.mlp_gate = gate("attn_gate"), gate("mlp_gate")

  def media_kv(self, media: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Media tokens [B, M, width] -> their keys and values [B, M, heads, head_dim] (decoding
    computes them once, at prefill)."""
    axes = ("act_batch", "act_length", "act_heads", None)
    return constrain(self.k(media), axes), constrain(self.v(media), axes)

  def __call__(
    self, x: jax.Array, kv: tuple[jax.Array, jax.Array], query_media: jax.Array, key_media: jax.Array
  ) -> jax.Array:
    """x [B, T, width]; query_media [B, T] (media_ids), key_media [B, M] (key_ids)."""
    q = self.q(self.attn_norm(x))
    o = attention(q, *kv, q_segment_ids=query_media, kv_segment_ids=key_media, causal=False)
    o = jnp.where(query_media[:, :, None, None] > 0, o, 0)  # no image yet: nothing to read
    residual = lambda x: constrain(x, ("act_batch", "act_length", "act_embed"))  # as bridge.ResamplerBlock's
    x = residual(x + jnp.tanh(self.attn_gate).astype(x.dtype) * self.o(o))
    h = ACTIVATIONS["gelu"](self.fc1(self.mlp_norm(x)))
    return residual(x + jnp.tanh(self.mlp_gate).astype(x.dtype) * self.fc2(h))
