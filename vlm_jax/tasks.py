"""Tasks: what a batch holds and how a step's loss is made, one registry entry per `config.task`.

A task builds its model from the config, gives the dummy inputs its params are shaped by, and
turns (apply_fn, params, batch) into a summed loss and the count that normalises it. The train
step (train/step.py) and the eval loss (build.Run.eval_step) are written once, over any task.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import check_one_of
from vlm_jax.models.vlm import VLM

Loss = Callable[[Callable, dict, dict], tuple[jax.Array, jax.Array]]  # (apply_fn, params, batch) -> (sum, count)


@dataclasses.dataclass(frozen=True)
class Task:
  make_model: Callable[[ml_collections.ConfigDict, int], nn.Module]     # (config, image_token_id)
  dummy_inputs: Callable[[ml_collections.ConfigDict, int], tuple]       # (config, rows) -> model inputs
  loss: Loss


# --- vlm: images + text -> next-token loss on the supervised (answer) tokens ------------------
VLM_INPUTS = ("tokens", "images", "positions", "segment_ids")  # a batch also holds targets, loss_mask


def _vlm_dummy_inputs(config: ml_collections.ConfigDict, rows: int = 1) -> tuple[jax.Array, ...]:
  v, length = config.model.vision, config.data.seq_len
  images = jnp.zeros((rows, 1, v.image_size, v.image_size, 3), jnp.float32)
  if config.model.anyres.enabled:  # one group, one tile, one tap: shapes do not matter to init
    images = {"tiles": jnp.zeros((1, 1, v.image_size, v.image_size, 3), jnp.float32),
              "index": jnp.zeros((rows, length, 1), jnp.int32),
              "weight": jnp.zeros((rows, length, 1), jnp.float32)}
  return (jnp.zeros((rows, length), jnp.int32), images,
          jnp.zeros((rows, length), jnp.int32), jnp.ones((rows, length), jnp.int32))


def _vlm_loss(apply_fn: Callable, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  return apply_fn({"params": params}, *(batch[k] for k in VLM_INPUTS), batch["targets"], batch["loss_mask"],
                  method="loss")


TASKS = {
    "vlm": Task(lambda config, image_token_id: VLM(config.model, image_token_id, tuple(config.data.image_mean),
                                                   tuple(config.data.image_std)),
                _vlm_dummy_inputs, _vlm_loss),
}


def task_of(config: ml_collections.ConfigDict) -> Task:
  check_one_of("config.task", config.task, TASKS)
  return TASKS[config.task]
