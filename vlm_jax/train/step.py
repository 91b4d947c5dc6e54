"""The train step: a pure function of (state, batch), jitted by train/trainer.py with explicit shardings.

state = {"step": int32[], "params": tree, "opt_state": tree}. A batch is a dict of arrays with a
leading global batch axis, its loss made by the run's task (vlm_jax/tasks.py); with grad_accum =
k it is split into k micro-batches that are scanned over, and the loss is normalised by the
total count (supervised tokens), not a mean of micro-batch means, so accumulation gives the
same step as one big batch.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vlm_jax.train.optim import FROZEN


def trainable_part(params, labels):
  """params with None for the frozen leaves: the step differentiates only the rest, so JAX skips
  frozen weights' gradients (and, for a frozen encoder that nothing trainable feeds, its whole
  backward pass), and frozen leaves may be integers (QLoRA's quantized base weights)."""
  return jax.tree.map(lambda p, l: None if l == FROZEN else p, params, labels)


def with_frozen(trainable, params):
  """The trainable leaves put back among the frozen ones of params."""
  return jax.tree.map(lambda t, p: p if t is None else t, trainable, params, is_leaf=lambda x: x is None)


def train_step(
  state: dict,
  batch: dict,
  *,
  loss: Callable,
  tx: optax.GradientTransformation,
  labels,
  grad_accum: int,
  lr_fn: Callable,
  seed: int = 0,
) -> tuple[dict, dict[str, Any]]:
  """loss: (params, batch, rng) -> (summed loss, count), the task's; rng: the step's dropout key
  (from the seed and step, one per micro-batch)."""

  def summed_loss(trainable, micro, rng):
    loss_sum, count = loss(with_frozen(trainable, state["params"]), micro, rng)
    return loss_sum, (loss_sum, count)

  grad_fn = jax.grad(summed_loss, has_aux=True)
  trainable = trainable_part(state["params"], labels)
  rng = jax.random.fold_in(jax.random.key(seed), state["step"])
  if grad_accum == 1:
    grads, (loss_sum, count) = grad_fn(trainable, batch, rng)
  else:
    micro_batches = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

    def accumulate(carry, indexed):
      index, micro = indexed
      grads, (loss_sum, count) = grad_fn(trainable, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (grads, loss_sum, count)), None

    zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro_batches))

  denom = jnp.maximum(count, 1.0)
  # The optimizer sees the whole tree; frozen leaves get a scalar zero (set_to_zero ignores it).
  grads = with_frozen(
    jax.tree.map(lambda g: g / denom, grads), jax.tree.map(lambda p: jnp.zeros((), jnp.float32), state["params"])
  )
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  # Frozen params are passed through untouched: bit-identical, whatever the update arithmetic.
  params = jax.tree.map(lambda p, u, l: p if l == FROZEN else p + u.astype(p.dtype), state["params"], updates, labels)
  metrics = {
    "train/loss": loss_sum / denom,
    "train/grad_norm": optax.tree.norm(grads),
    "train/lr": lr_fn(state["step"]),
    "train/supervised_tokens": count,
  }
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics
