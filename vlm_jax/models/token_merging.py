"""ToMe, Token Merging (Bolya et al. 2023, github facebookresearch/ToMe): after each ViT block's
attention, the r most similar pairs of tokens are merged into their size-weighted average, so
later blocks (and the VLM) read fewer tokens. Bipartite soft matching finds the pairs; proportional
attention (log of the size added to the logits) lets a merged token weigh as the tokens it holds.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def merged_per_block(n: int, r: int, protected: int) -> int:
  """Tokens a block with n tokens merges: r, capped at half of the unprotected ones (each merged
  token needs a distinct partner on the other side of the bipartite split)."""
  return min(r, (n - protected) // 2)


def counts(n: int, r: int, depth: int, protected: int) -> list[int]:
  """Token counts [before block 1, after block 1, ..., after block `depth`] of a ViT with n input
  tokens merging r per block; protected: 1 with a CLS token (never merged), else 0."""
  out = [n]
  for _ in range(depth):
    out.append(out[-1] - merged_per_block(out[-1], r, protected))
  return out


class Matching(NamedTuple):
  """Which tokens a merge moves, per example, as indices into the even positions (side a) and
  the odd ones (side b) of the sequence."""

  unmerged: jax.Array  # [B, A - r] a-tokens kept, in their original order
  src: jax.Array  # [B, r] a-tokens merged away
  dst: jax.Array  # [B, r] the b-token each of them merges into


def bipartite_soft_matching(metric: jax.Array, r: int, protected: int) -> Matching:
  """ToMe's matching of metric [B, N, C]: every a-token's most similar b-token (cosine), and the
  r a-tokens with the most similar partners merge into them. protected: 1 keeps the CLS token
  (index 0, on side a) out of any merge, 0 merges any token. r is capped as in `counts`."""
  r = merged_per_block(metric.shape[1], r, protected)
  metric = jax.lax.stop_gradient(metric.astype(jnp.float32))  # only indices come out
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  scores = jnp.einsum("bic,bjc->bij", metric[:, ::2], metric[:, 1::2])
  if protected:
    scores = scores.at[:, 0].set(-jnp.inf)
  best = jnp.max(scores, axis=-1)
  edges = jnp.argsort(-best, axis=-1, stable=True)  # most similar first; a protected CLS last
  src = edges[:, :r]
  dst = jnp.take_along_axis(jnp.argmax(scores, axis=-1), src, axis=-1)
  return Matching(jnp.sort(edges[:, r:], axis=-1), src, dst)


def merge_sum(x: jax.Array, matching: Matching) -> jax.Array:
  """x [B, N, ...] -> [B, N - r, ...]: the unmerged a-tokens, then every b-token plus the a-tokens
  merged into it (ToMe's order, so a CLS token stays first)."""

  def one(x, unmerged, src, dst):
    a, b = x[::2], x[1::2]
    return jnp.concatenate([a[unmerged], b.at[dst].add(a[src])])

  return jax.vmap(one)(x, *matching)


def merge_weighted(x: jax.Array, size: jax.Array, matching: Matching) -> tuple[jax.Array, jax.Array]:
  """x [B, N, D] with size [B, N] (fp32: the patches each token holds) -> the merged tokens,
  each the size-weighted mean of what it holds, and their sizes (ToMe's merge_wavg). In fp32."""
  new_size = merge_sum(size, matching)
  merged = merge_sum(x.astype(jnp.float32) * size[..., None], matching) / new_size[..., None]
  return merged.astype(x.dtype), new_size


def proportional_attention(q: jax.Array, k: jax.Array, v: jax.Array, size: jax.Array) -> jax.Array:
  """q, k, v [B, T, N, H], size [B, T] -> [B, T, N, H]: bidirectional attention in which a key of
  size s counts as s copies of itself (log s added to its logits), as its unmerged tokens would.
  jax.nn.dot_product_attention's reference path adds the bias to fp32 logits, so with sizes all
  one this is attention.attention(..., implementation="xla") exactly."""
  bias = jnp.log(size.astype(jnp.float32))[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
