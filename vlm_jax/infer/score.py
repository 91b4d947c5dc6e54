"""Log-likelihood of continuations: sum of log p(token | everything before it) over a row's
scored positions, and whether greedy decoding would have produced those tokens. What
multiple-choice harnesses (lmms-eval's `loglikelihood`) rank the options by.

Rows are right-padded to a length bucket and to the mesh's batch multiple, so a few compiled
programs serve any mix of lengths.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.build import in_mesh
from vlm_jax.infer.generate import bucket, pad_rows
from vlm_jax.models.vlm import VLM


def _score(params, tokens, images, mask, *, model: VLM) -> tuple[jax.Array, jax.Array]:
  """tokens [B, L]; mask [B, L]: True where token t is scored (given tokens < t)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits = model.apply({"params": params}, tokens, images, positions, jnp.ones_like(tokens))[:, :-1]
  targets, scored = tokens[:, 1:], mask[:, 1:]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), targets[..., None], -1)[..., 0]
  greedy = jnp.argmax(logits, -1) == targets
  return jnp.sum(jnp.where(scored, logp, 0.0), -1), jnp.all(greedy | ~scored, -1)


class Scorer:
  """Log-likelihoods for one model on one mesh; compiled once per (rows, length bucket)."""

  def __init__(self, model: VLM, mesh: Mesh, *, pad_id: int):
    self.mesh, self.pad_id = mesh, pad_id
    self.batch_multiple = parallel.batch_divisor(mesh)
    self._score = in_mesh(jax.jit(functools.partial(_score, model=model)), mesh)

  def __call__(
    self, params, sequences: Sequence[np.ndarray], scored: Sequence[np.ndarray], images
  ) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each sequence's scored tokens (bool mask, same length);
    images: the rows' image input ([B, N, H, W, 3] or AnyRes's dict), B = len(sequences)."""
    n = len(sequences)
    rows = -(-n // self.batch_multiple) * self.batch_multiple
    length = bucket(max(len(s) for s in sequences))
    tokens = np.full((rows, length), self.pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, (s, m) in enumerate(zip(sequences, scored)):
      tokens[i, : len(s)], mask[i, : len(m)] = s, m
    logp, greedy = jax.device_get(self._score(params, tokens, pad_rows(images, rows - n), mask))
    return [(float(logp[i]), bool(greedy[i])) for i in range(n)]
