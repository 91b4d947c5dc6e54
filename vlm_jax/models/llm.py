"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, gated MLP.

Variants by config: Qwen2's QKV bias, Mistral's sliding window, Gemma's (1 + scale) norms,
sqrt(width) token-embedding scale and GELU gate, Llama 3.1's RoPE frequency scaling.

Decoding (`extend`) reads and writes a preallocated KV cache (`init_cache`): a dict of
k/v, one [rows x kv_heads, slots, head_dim] array per layer (row b's kv head j at b * kv_heads
+ j), `start` [rows] (a row's first slot: prompts are left-padded so that every row writes the
same slot) and `index` (the next slot to write).
"""

from typing import Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.attention import attention, cache_mask, cached_attention
from vlm_jax.losses import chunked_token_loss, token_loss
from vlm_jax.models.layers import ACTIVATIONS, Compute, LayerStack, RMSNorm, constrain, dense, logical


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
    smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the HF Llama layout (rotate halves), computed in fp32. x [B,T,N,H]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,H/2]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# The layout is the one the decoding loop updates in place and attention reads in place. A
# stacked [layers, ...] cache made the CPU backend copy each layer's slice out at every step; a
# [rows, kv_heads, ...] one (merged into one batch dim for the matmuls) made it copy every layer's
# cache three times per step, to feed the in-place update and the merged view separately.
CACHE_AXES = ("act_batch_kv_heads", "act_length", "head_dim")


def init_cache(cfg: ml_collections.ConfigDict, start: jax.Array, slots: int, dtype: jnp.dtype) -> dict:
  """An empty KV cache of `slots` slots for rows whose sequences begin at slot start [rows]."""
  shape = (start.shape[0] * cfg.kv_heads, slots, cfg.head_dim)
  empty = lambda: tuple(constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(cfg.depth))
  return {"k": empty(), "v": empty(), "start": start.astype(jnp.int32), "index": jnp.zeros((), jnp.int32)}


def unstack_layers(llm_params: dict) -> dict:
  """LLM params with the stacked "layers" -> one "block_<i>" subtree per layer (LLM.layer_list)."""
  out = {k: v for k, v in llm_params.items() if k != "layers"}
  depth = jax.tree.leaves(llm_params["layers"])[0].shape[0]
  for i in range(depth):
    out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], llm_params["layers"])
  return out


# {layer index: fn(x) -> x} run on the residual stream before those layers (cross-attention fusion).
Inserts = Mapping[int, Callable[[jax.Array], jax.Array]]


class Decoding(NamedTuple):
  """What one cached call shares across layers."""

  index: jax.Array  # int32 []: the cache slot of the first new token
  mask: jax.Array  # bool [B, 1, T, S]: attention.cache_mask


class DecoderBlock(nn.Module):
  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype
  compute: Compute

  @nn.compact
  def __call__(self, carry, positions, segment_ids, decoding: Decoding | None):
    """carry: (x, None) in training; (x, this layer's cache {"k", "v"}) when decoding, where the
    block writes its new keys and values at slot decoding.index and attends to the cache."""
    x, cache = carry
    c, dt = self.cfg, self.dtype
    h = RMSNorm(c.norm_eps, dt, c.norm_offset, name="attn_norm")(x)
    q = dense((c.heads, c.head_dim), ("embed", "heads", "head_dim"), name="q", dtype=dt, use_bias=c.qkv_bias)(h)
    k = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k", dtype=dt, use_bias=c.qkv_bias)(h)
    v = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v", dtype=dt, use_bias=c.qkv_bias)(h)
    inv_freq = rope_inv_freq(c)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    if decoding is None:
      o = attention(
        q,
        k,
        v,
        q_segment_ids=segment_ids,
        causal=True,
        implementation=self.compute.attention,
        window=c.sliding_window,
        block=self.compute.attention_block,
      )
    else:
      cache_rows = lambda a: a.transpose(0, 2, 1, 3).reshape(-1, a.shape[1], a.shape[3])  # [B,T,K,H] -> [B*K,T,H]
      cache = {
        name: jax.lax.dynamic_update_slice(
          cache[name], cache_rows(new).astype(cache[name].dtype), (0, decoding.index, 0)
        )
        for name, new in (("k", k), ("v", v))
      }
      o = cached_attention(q, cache["k"].astype(dt), cache["v"].astype(dt), decoding.mask)
    x = x + dense(c.width, ("heads", "head_dim", "embed"), name="o", dtype=dt, n_in=2)(o)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    h = RMSNorm(c.norm_eps, dt, c.norm_offset, name="mlp_norm")(x)
    gate = dense(c.mlp_dim, ("embed", "mlp"), name="gate", dtype=dt)(h)
    up = dense(c.mlp_dim, ("embed", "mlp"), name="up", dtype=dt)(h)
    h = constrain(ACTIVATIONS[c.mlp_act](gate) * up, ("act_batch", "act_length", "act_mlp"))
    x = x + dense(c.width, ("mlp", "embed"), name="down", dtype=dt)(h)
    return (constrain(x, ("act_batch", "act_length", "act_embed")), cache), None


class LLM(nn.Module):
  """Decoder LLM. `embed` maps ids to vectors; `__call__` maps vectors to fp32 logits."""

  cfg: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.bfloat16
  compute: Compute = Compute()
  # Decoding: one param subtree per layer ("block_<i>", see unstack_layers) instead of one
  # stacked scan. A scan slices each layer's weights out of the stack every step, which the CPU
  # backend does by copying them: decoding reads weights, so that tripled its memory traffic.
  layer_list: bool = False

  def setup(self):
    c = self.cfg
    self.embedder = nn.Embed(
      c.vocab_size,
      c.width,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      # std 1 (as MaxText): token identity must not be drowned by the O(1) outputs
      # of the first layers and the visual tokens in the residual stream.
      embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")),
    )
    if self.layer_list:
      self.block = [DecoderBlock(c, self.dtype, self.compute) for _ in range(c.depth)]
    else:
      self.layers = LayerStack(DecoderBlock, c.depth, self.compute, n_broadcast=3, fields=dict(cfg=c, dtype=self.dtype))
    self.final_norm = RMSNorm(c.norm_eps, self.dtype, c.norm_offset)
    if not c.tie_embeddings:
      self.lm_head = self.param(
        "lm_head", logical(nn.initializers.lecun_normal(), ("embed", "vocab")), (c.width, c.vocab_size), jnp.float32
      )

  def embed(self, tokens: jax.Array) -> jax.Array:
    x = self.embedder(tokens)
    if self.cfg.embed_scale:
      # Gemma: token embeddings times sqrt(width) rounded to the compute dtype; inputs that are
      # not tokens (visual tokens) are not scaled, as transformers' GemmaTextScaledWordEmbedding.
      x = x * jnp.asarray(self.cfg.width**0.5, x.dtype)
    return constrain(x, ("act_batch", "act_length", "act_embed"))

  def __call__(
    self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, inserts: Inserts | None = None
  ) -> jax.Array:
    """Embeddings [B, T, D] -> fp32 logits [B, T, vocab] (training, scoring)."""
    x, _ = self._layers(x, positions, segment_ids, inserts=inserts)
    return self._logits(x)

  def loss(
    self,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    inserts: Inserts | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Embeddings [B, T, D] -> (summed fp32 cross-entropy over the supervised targets, their count)."""
    x, _ = self._layers(x, positions, segment_ids, inserts=inserts)
    if not self.compute.loss_chunk:
      return token_loss(self._logits(x), targets, loss_mask)
    return chunked_token_loss(self.final_norm(x), self._head(), targets, loss_mask, self.compute.loss_chunk)

  def extend(self, x: jax.Array, cache: dict, inserts: Inserts | None = None) -> tuple[jax.Array, dict]:
    """Embeddings [B, T, D] of the tokens at cache slots index..index+T-1 -> (fp32 logits of the
    last one [B, vocab], the cache with them written). Prefill is T = the prompt, decode T = 1."""
    t, slots = x.shape[1], cache["k"][0].shape[1]
    q_slots = cache["index"] + jnp.arange(t, dtype=jnp.int32)
    positions = q_slots[None, :] - cache["start"][:, None]
    decoding = Decoding(cache["index"], cache_mask(cache["start"], q_slots, slots, self.cfg.sliding_window))
    x, kv = self._layers(x, positions, None, decoding, cache, inserts)
    return self._logits(x[:, -1:])[:, 0], dict(cache, **kv, index=cache["index"] + t)

  def _layers(
    self,
    x,
    positions,
    segment_ids,
    decoding: Decoding | None = None,
    cache: dict | None = None,
    inserts: Inserts | None = None,
  ):
    """-> (x, None); decoding, (x, the cache's k/v with this call's tokens written)."""
    inserts = inserts or {}
    if not self.layer_list:
      if decoding is not None:
        raise ValueError("decoding reads the layer-list layout: VLM(layer_list=True) with unstack_params")
      # Between layers the carry is (x, None): an insert maps x.
      on_x = {i: (lambda carry, f=f: (f(carry[0]), None)) for i, f in inserts.items()}
      (x, _), _ = self.layers((x, None), positions, segment_ids, None, inserts=on_x)
      return x, None
    written = []
    for i, block in enumerate(self.block):
      if i in inserts:
        x = inserts[i](x)
      mine = None if decoding is None else {"k": cache["k"][i], "v": cache["v"][i]}
      (x, mine), _ = block((x, mine), positions, segment_ids, decoding)
      written.append(mine)
    if decoding is None:
      return x, None
    return x, {name: tuple(constrain(w[name], CACHE_AXES) for w in written) for name in ("k", "v")}

  def _head(self) -> jax.Array:
    """[width, vocab] in the compute dtype."""
    return (self.embedder.embedding.T if self.cfg.tie_embeddings else self.lm_head).astype(self.dtype)

  def _logits(self, x: jax.Array) -> jax.Array:
    logits = jnp.einsum("btd,dv->btv", self.final_norm(x), self._head(), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))
