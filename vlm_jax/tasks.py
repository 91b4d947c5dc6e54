"""Tasks: what a batch holds and how a step's loss is made, one registry entry per `config.task`.

A task builds its model from the config, gives the dummy inputs its params are shaped by, and
turns (apply_fn, params, batch) into a summed loss and the count that normalises it. The train
step (train/step.py) and the eval loss (build.Run.eval_step) are written once, over any task.
Its `layout` names what the data pipeline assembles (data/pipeline.py LAYOUTS).
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import check_one_of
from vlm_jax.errors import UserError
from vlm_jax.models import contrastive, vlm

Loss = Callable[[Callable, dict, dict], tuple[jax.Array, jax.Array]]  # (apply_fn, params, batch) -> (sum, count)


@dataclasses.dataclass(frozen=True)
class Task:
  make_model: Callable[[ml_collections.ConfigDict, int], nn.Module]  # (config, image_token_id)
  dummy_inputs: Callable[[ml_collections.ConfigDict, int], tuple]  # (config, rows) -> model inputs
  loss: Loss
  check: Callable[[ml_collections.ConfigDict], None]  # config -> None, or a UserError naming the field
  layout: str  # the batches' (data/pipeline.py LAYOUTS)


# --- vlm: images + text -> next-token loss on the supervised (answer) tokens ------------------
VLM_INPUTS = ("tokens", "images", "positions", "segment_ids")  # a batch also holds targets, loss_mask


def _vlm_dummy_inputs(config: ml_collections.ConfigDict, rows: int = 1) -> tuple[jax.Array, ...]:
  v, length = config.model.vision, config.data.seq_len
  images = jnp.zeros((rows, 1, v.image_size, v.image_size, 3), jnp.float32)
  if config.model.anyres.enabled:  # one group, one tile, one tap: shapes do not matter to init
    images = {
      "tiles": jnp.zeros((1, 1, v.image_size, v.image_size, 3), jnp.float32),
      "index": jnp.zeros((rows, length, 1), jnp.int32),
      "weight": jnp.zeros((rows, length, 1), jnp.float32),
    }
  return (
    jnp.zeros((rows, length), jnp.int32),
    images,
    jnp.zeros((rows, length), jnp.int32),
    jnp.ones((rows, length), jnp.int32),
  )


def _vlm_loss(apply_fn: Callable, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  return apply_fn(
    {"params": params}, *(batch[k] for k in VLM_INPUTS), batch["targets"], batch["loss_mask"], method="loss"
  )


# --- contrastive: image-caption pairs -> CLIP / SigLIP loss over the global batch -------------
def _contrastive_dummy_inputs(config: ml_collections.ConfigDict, rows: int = 1) -> tuple[jax.Array, ...]:
  size = config.model.vision.image_size
  return (jnp.zeros((rows, size, size, 3), jnp.float32), jnp.zeros((rows, config.data.seq_len), jnp.int32))


def _contrastive_loss(apply_fn: Callable, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  return apply_fn({"params": params}, batch["images"], batch["text"], method="loss")


def _check_contrastive(config: ml_collections.ConfigDict) -> None:
  contrastive.check_config(config.model)
  if config.train.grad_accum != 1:
    # Micro-batches would each see only their own negatives: not the step of one big batch.
    raise UserError(
      f"config.train.grad_accum: the contrastive loss needs the whole batch at once; set it 1, "
      f"not {config.train.grad_accum}"
    )
  if config.data.seq_len > config.model.text.max_len:
    raise UserError(
      f"config.data.seq_len ({config.data.seq_len}): captions longer than the text tower's "
      f"positions (config.model.text.max_len = {config.model.text.max_len})"
    )


def _check_vlm(config: ml_collections.ConfigDict) -> None:
  vlm.check_config(config.model)
  if config.data.seq_len > config.model.llm.max_len:
    raise UserError(
      f"config.data.seq_len ({config.data.seq_len}) is longer than the model's context "
      f"(config.model.llm.max_len = {config.model.llm.max_len}): the trained model would refuse its "
      f"own prompts; set --config.model.llm.max_len={config.data.seq_len} (a longer context over "
      "the same RoPE) or a shorter seq_len"
    )


def _image_stats(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
  return tuple(config.data.image_mean), tuple(config.data.image_std)


TASKS = {
  "vlm": Task(
    lambda config, image_token_id: vlm.VLM(config.model, image_token_id, *_image_stats(config)),
    _vlm_dummy_inputs,
    _vlm_loss,
    _check_vlm,
    "conversations",
  ),
  "contrastive": Task(
    lambda config, image_token_id: contrastive.Contrastive(config.model, *_image_stats(config)),
    _contrastive_dummy_inputs,
    _contrastive_loss,
    _check_contrastive,
    "pairs",
  ),
}


def task_of(config: ml_collections.ConfigDict) -> Task:
  check_one_of("config.task", config.task, TASKS)
  return TASKS[config.task]
