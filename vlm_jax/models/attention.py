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
              implementation: str | None = "xla", window: int = 0,
              mask: jax.Array | None = None) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H] with N % K == 0 -> [B,T,N,H].

  Padding queries (segment 0) see nothing and come out finite (zeros on xla); packed samples
  (distinct segment ids) never attend across each other. Query head n reads kv head
  n // (N // K), as HF's repeat_kv. window > 0 (causal): a query sees its last `window` keys,
  itself included (Mistral's sliding window: key > query - window). mask [B,1,T,S]
  (decoding, see cache_mask) replaces the segment, causal and window rules.
  """
  if mask is not None:
    causal, window = False, 0
  elif q_segment_ids is not None:
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    mask = segment_mask(q_segment_ids, kv_segment_ids)
  impl = None if implementation == "auto" else implementation
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl,
                                      local_window_size=local)
