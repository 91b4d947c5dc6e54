"""The one attention entry point: masks from segment ids, causal or bidirectional, GQA."""

import jax


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, S] boolean: a query attends only to keys of its own (non-padding) segment."""
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


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
