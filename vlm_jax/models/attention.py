"""The one attention entry point: masks from segment ids, causal or bidirectional, GQA; and the
mask of a query block against a KV cache."""

import jax
import jax.numpy as jnp


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, S] boolean: a query attends only to keys of its own (non-padding) segment."""
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


def cache_mask(start: jax.Array, q_slots: jax.Array, cache_len: int, window: int = 0) -> jax.Array:
  """[B, 1, T, S] boolean for queries at cache slots q_slots [T] over a cache of S slots whose
  row b holds its sequence from slot start[b] on (left padding): causal, and within the window
  (slots of one row are consecutive positions, so slot distance is position distance)."""
  kv = jnp.arange(cache_len)[None, None, :]
  q = q_slots[None, :, None]
  mask = (kv >= start[:, None, None]) & (kv <= q)
  if window > 0:
    mask &= kv > q - window
  return mask[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, causal: bool,
              implementation: str | None = "xla", window: int = 0) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H] with N % K == 0 -> [B,T,N,H].

  Padding queries (segment 0) see nothing and come out finite (zeros on xla); packed samples
  (distinct segment ids) never attend across each other. Query head n reads kv head
  n // (N // K), as HF's repeat_kv. window > 0 (causal): a query sees its last `window` keys,
  itself included (Mistral's sliding window: key > query - window).
  """
  mask = None
  if q_segment_ids is not None:
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    mask = segment_mask(q_segment_ids, kv_segment_ids)
  impl = None if implementation == "auto" else implementation
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl,
                                      local_window_size=local)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B,T,N,H] against one layer's KV cache k/v [B*K,S,H] (row b's kv head j at b*K + j) under
  mask [B,1,T,S] (cache_mask) -> [B,T,N,H]. Same numerics as `attention` (fp32 logits and
  softmax, probabilities in the cache's dtype).

  Two matmuls over one batch dim (rows x kv heads) that read the cache in place: with two batch
  dims, or slots before heads, the CPU backend loops over small matmuls or copies the cache
  first, and decoding took twice as long.
  """
  b, t, n, h = q.shape
  kv_heads, slots = k.shape[0] // b, k.shape[1]
  group = n // kv_heads
  q = q.reshape(b, t, kv_heads, group, h).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, group * t, h)
  logits = jnp.einsum("nqh,nsh->nqs", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
  logits = jnp.where(mask[:, :, None], logits.reshape(b, kv_heads, group, t, slots),
                     0.7 * jnp.finfo(jnp.float32).min)  # as jax.nn.dot_product_attention
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b * kv_heads, group * t, slots)
  out = jnp.einsum("nqs,nsh->nqh", probs, v)
  return out.reshape(b, kv_heads, group, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
