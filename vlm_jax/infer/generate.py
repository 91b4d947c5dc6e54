"""Batched greedy decoding in static shapes (one compiled loop per batch shape).

Each step re-runs the decoder over the whole buffer (no KV cache yet): simple and exact, fine for
short answers; the inference issue replaces it with prefill + KV-cache decode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.models.vlm import VLM

BUCKET = 32  # buffer lengths are rounded up to this, so a few shapes serve all prompts


def _greedy(params, tokens, lengths, images, *, model: VLM, max_new_tokens: int, eos_id: int):
  batch, total = tokens.shape
  rows = jnp.arange(batch)
  positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
  # Causal attention: the tokens after a row's end are never seen by the positions we read.
  segment_ids = jnp.ones((batch, total), jnp.int32)
  variables = {"params": params}
  embeds = model.apply(variables, tokens, images, method=VLM.embed)

  def body(_, carry):
    tokens, embeds, lengths, done = carry
    logits = model.apply(variables, embeds, positions, segment_ids, method=VLM.decode)
    next_token = jnp.argmax(logits[rows, lengths - 1], axis=-1).astype(jnp.int32)
    write = ~done & (lengths < total)
    at = jnp.minimum(lengths, total - 1)
    tokens = tokens.at[rows, at].set(jnp.where(write, next_token, tokens[rows, at]))
    new_embeds = model.apply(variables, next_token[:, None], method=VLM.embed_text)[:, 0]
    embeds = embeds.at[rows, at].set(jnp.where(write[:, None], new_embeds, embeds[rows, at]))
    done = done | ~write | (next_token == eos_id)
    return tokens, embeds, lengths + write.astype(jnp.int32), done

  done = jnp.zeros((batch,), bool)
  tokens, _, lengths, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, embeds, lengths, done))
  return tokens, lengths


class Greedy:
  """Greedy decoder for one model; compiled once per (rows, buffer length, max_new_tokens)."""

  def __init__(self, model: VLM, mesh: Mesh, *, eos_id: int, pad_id: int):
    self.pad_id, self.eos_id = pad_id, eos_id
    self.batch_multiple = parallel.batch_divisor(mesh)
    # Replicated results: every process of a multi-host mesh can read all rows.
    self._fn = jax.jit(functools.partial(_greedy, model=model, eos_id=eos_id),
                       static_argnames=("max_new_tokens",), out_shardings=parallel.replicated(mesh))

  def __call__(self, params, prompts: list[np.ndarray], images: "np.ndarray | dict",
               max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (ids, placeholders included) -> new ids (eos dropped).

    images [B, N, H, W, 3], or AnyRes's {"tiles", "index", "weight"} (data/anyres_batch.py).
    Rows are padded up to a multiple of `batch_multiple` (the mesh's batch axes) and the buffer
    to a multiple of BUCKET.
    """
    n, pad_id, eos_id = len(prompts), self.pad_id, self.eos_id
    rows = -(-n // self.batch_multiple) * self.batch_multiple
    longest = max(len(p) for p in prompts)
    total = -(-(longest + max_new_tokens) // BUCKET) * BUCKET
    tokens = np.full((rows, total), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    # AnyRes images are a dict with one tile group per row: every leaf pads the same way.
    padded_images = jax.tree.map(
        lambda x: np.concatenate([x, np.zeros((rows - n,) + x.shape[1:], x.dtype)]), images)
    out, out_lengths = self._fn(params, tokens, lengths, padded_images, max_new_tokens=max_new_tokens)
    out, out_lengths = np.asarray(out), np.asarray(out_lengths)
    results = []
    for i, p in enumerate(prompts):
      new = out[i, len(p):out_lengths[i]].tolist()
      results.append(new[:new.index(eos_id)] if eos_id in new else new)
    return results
