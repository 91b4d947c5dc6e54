"""Optimizer: AdamW + warmup-cosine + global-norm clipping; freezing and per-component LR by param path.

Frozen params get `optax.set_to_zero` inside `multi_transform`: no Adam moments are allocated for
them and their update is exactly zero. The train step also stops their gradients, so no backward
pass runs through a frozen encoder.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.build import path_str
from vlm_jax.config import COMPONENTS
from vlm_jax.errors import UserError
from vlm_jax.models import lora

FROZEN = "frozen"
STAGE_TRAINS = {"stage1": ("bridge",), "stage2": ("bridge", "llm"), "full": COMPONENTS}


def component(path: str) -> str:
  """vision / bridge / llm; top-level extras (image_newline, ...) belong to the bridge."""
  top = path.split("/", 1)[0]
  return top if top in COMPONENTS else "bridge"


def param_labels(params, train_cfg: ml_collections.ConfigDict, stage: str):
  """Tree of labels: the component name where the param trains, FROZEN elsewhere. A component
  with LoRA adapters trains only them (when its stage trains it)."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  adapted = {component(p) for p in paths if lora.is_adapter(p)}
  if train_cfg.trainable:
    patterns = [p.strip() for p in train_cfg.trainable.split(",") if p.strip()]
    try:
      compiled = [re.compile(p) for p in patterns]
    except re.error as e:
      raise UserError(f"config.train.trainable: bad regex: {e}") from None
    for pattern, regex in zip(patterns, compiled):
      if not any(regex.fullmatch(p) for p in paths):
        raise UserError(f"config.train.trainable: pattern {pattern!r} matches no parameter")
    trains = lambda p: any(r.fullmatch(p) for r in compiled)
  else:
    trains = lambda p: component(p) in STAGE_TRAINS[stage] and (component(p) not in adapted or lora.is_adapter(p))

  def label(path, x):
    p = path_str(path)
    comp = component(p)
    floating = jnp.issubdtype(x.dtype, jnp.floating)  # not QLoRA's integer codes, whatever a regex says
    return comp if trains(p) and floating and train_cfg.lr_mult[comp] > 0 else FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def schedule(train_cfg: ml_collections.ConfigDict, mult: float = 1.0) -> optax.Schedule:
  peak = train_cfg.lr * mult
  # A run shorter than the warmup (a quick check) warms up over all but its last step.
  warmup = max(min(train_cfg.warmup_steps, train_cfg.steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, warmup, max(train_cfg.steps, 1), end_value=peak * train_cfg.end_lr_ratio
  )


def make_optimizer(train_cfg: ml_collections.ConfigDict, labels) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms/biases
  transforms = {FROZEN: optax.set_to_zero()}
  for comp in COMPONENTS:
    transforms[comp] = optax.adamw(
      schedule(train_cfg, train_cfg.lr_mult[comp]),
      b1=train_cfg.b1,
      b2=train_cfg.b2,
      weight_decay=train_cfg.weight_decay,
      mask=decay_mask,
    )
  return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), optax.multi_transform(transforms, labels))
