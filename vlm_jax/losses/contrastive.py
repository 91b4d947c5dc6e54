"""Contrastive image-text losses: CLIP's softmax loss and SigLIP's sigmoid loss.

Both take the global batch's embeddings and return the loss over the global batch. Called under
`jax.set_mesh` with the batch split over the batch axes, they run per shard in a `jax.shard_map`:
CLIP gathers both towers' embeddings (its softmax needs every column of a row); SigLIP never
gathers, the text chunks go round the ring of shards (the SigLIP paper's chunked form), so each
device holds only [B/n, D] of texts and [B/n, B/n] logits at a time.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.config import BATCH_AXES

MAX_LOG_SCALE = math.log(100.0)  # CLIP clips its temperature at 100


def clip_loss(
  image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *, batch_axes: tuple[str, ...] = BATCH_AXES
) -> jax.Array:
  """CLIP's symmetric softmax cross-entropy, a scalar fp32 mean over the global batch.

  image_emb, text_emb: [B, D], L2-normalised by the caller; row i of each is a pair.
  logit_scale: scalar, the log of the inverse temperature; clipped at log(100) (no gradient above).
  Returns (CE(image -> text) + CE(text -> image)) / 2, each averaged over the B rows.
  """
  image_emb, text_emb, scale = _fp32(image_emb, text_emb, logit_scale)
  axes, n = _batch_shards(image_emb, text_emb, batch_axes)
  scale = jnp.exp(jnp.minimum(scale, MAX_LOG_SCALE))
  b = image_emb.shape[0]
  if n == 1:
    labels = jnp.arange(b)
    return (_ce_sum(scale * image_emb @ text_emb.T, labels) + _ce_sum(scale * text_emb @ image_emb.T, labels)) / (2 * b)

  def shard(image, text, scale):
    # A softmax row needs every column: gather the other tower, keep this shard's rows.
    all_images = jax.lax.all_gather(image, axes, tiled=True)
    all_texts = jax.lax.all_gather(text, axes, tiled=True)
    local = image.shape[0]
    labels = jax.lax.axis_index(axes) * local + jnp.arange(local)  # the local rows' global indices
    total = _ce_sum(scale * image @ all_texts.T, labels) + _ce_sum(scale * text @ all_images.T, labels)
    return jax.lax.psum(total, axes) / (2 * b)

  return _shard_map(shard, axes, image_emb, text_emb, scale)


def siglip_loss(
  image_emb: jax.Array,
  text_emb: jax.Array,
  t_prime: jax.Array,
  bias: jax.Array,
  *,
  batch_axes: tuple[str, ...] = BATCH_AXES,
) -> jax.Array:
  """SigLIP's pairwise sigmoid loss, a scalar fp32: -sum_ij log_sigmoid(label_ij * z_ij) / B.

  image_emb, text_emb: [B, D], L2-normalised by the caller; t_prime (log temperature) and bias
  are scalars. z_ij = exp(t_prime) * x_i . y_j + bias; label_ij = +1 if i == j else -1.
  """
  image_emb, text_emb, t_prime, bias = _fp32(image_emb, text_emb, t_prime, bias)
  axes, n = _batch_shards(image_emb, text_emb, batch_axes)
  b = image_emb.shape[0]
  if n == 1:
    return -_sigmoid_sum(image_emb, text_emb, jnp.exp(t_prime), bias, positives=True) / b

  def shard(image, text, t_prime, bias):
    temperature = jnp.exp(t_prime)
    # Own texts first: the only chunk with positives (its diagonal).
    total = _sigmoid_sum(image, text, temperature, bias, positives=True)
    ring = [(k, (k + 1) % n) for k in range(n)]  # indices over the combined batch axes

    def step(carry, _):
      total, text = carry
      text = jax.lax.ppermute(text, axes, ring)  # the previous shard's texts: negatives only
      return (total + _sigmoid_sum(image, text, temperature, bias, positives=False), text), None

    (total, _), _ = jax.lax.scan(step, (total, text), length=n - 1)
    return -jax.lax.psum(total, axes) / b

  return _shard_map(shard, axes, image_emb, text_emb, t_prime, bias)


# --- Helpers ---------------------------------------------------------------------------------------


def _fp32(*xs: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _batch_shards(
  image_emb: jax.Array, text_emb: jax.Array, batch_axes: tuple[str, ...]
) -> tuple[tuple[str, ...], int]:
  """The batch axes of the current mesh and how many shards they make (1: compute directly)."""
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(f"image and text embeddings must both be [B, D], got {image_emb.shape} and {text_emb.shape}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in axes)
  if image_emb.shape[0] % n:
    raise ValueError(
      f"contrastive loss: batch {image_emb.shape[0]} does not divide over the {n} shards of mesh axes {axes}"
    )
  return axes, n


def _shard_map(f, axes: tuple[str, ...], *args: jax.Array) -> jax.Array:
  """f per batch shard: embeddings split over `axes` (replicated over the others), scalars whole."""
  specs = tuple(P(axes, None) if x.ndim == 2 else P() for x in args)
  return jax.shard_map(f, mesh=jax.sharding.get_abstract_mesh(), in_specs=specs, out_specs=P())(*args)


def _ce_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Summed softmax cross-entropy of each row of logits against its label column."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


def _sigmoid_sum(
  image: jax.Array, text: jax.Array, temperature: jax.Array, bias: jax.Array, positives: bool
) -> jax.Array:
  """sum_ij log_sigmoid(label_ij * z_ij) of one block; labels +1 on its diagonal if `positives`."""
  z = temperature * image @ text.T + bias
  labels = 2 * jnp.eye(*z.shape, dtype=z.dtype) - 1 if positives else -1.0
  return jnp.sum(jax.nn.log_sigmoid(labels * z))
