"""config.train: the optimizer, its schedule, what trains, and the loop's cadence."""

import ml_collections

from vlm_jax.config.checks import check_one_of
from vlm_jax.config.model import COMPONENTS
from vlm_jax.errors import UserError

FROZEN_DTYPES = ("float32", "bfloat16")


def defaults() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 32  # global, summed over micro-batches
  t.grad_accum = 1  # micro-batches per step
  t.lr = 1e-3  # peak
  t.warmup_steps = 50
  t.end_lr_ratio = 0.1  # cosine decays to lr * end_lr_ratio
  t.weight_decay = 0.0
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  # Learning-rate multiplier per component (for the parts the stage trains).
  # (text: the contrastive task's text tower; its other params, heads and logit scale, count as bridge.)
  t.lr_mult = ml_collections.ConfigDict(dict(vision=1.0, bridge=1.0, llm=1.0, text=1.0))
  # Comma-separated regexes over param paths ("bridge/.*,llm/layers/.*"): if set, replaces the
  # stage's choice of what trains.
  t.trainable = ""
  # Storage of the params the stage freezes: bfloat16 halves their memory (stage 1: the LLM's);
  # the compute dtype reads them in bfloat16 anyway, so with model.dtype=bfloat16 only the norms'
  # scales, read in fp32, see the rounding.
  t.frozen_dtype = "float32"  # float32 | bfloat16
  t.log_every = 20
  t.eval_every = 200
  t.eval_examples = 256
  t.eval_batch_size = 64
  t.checkpoint_every = 200
  t.max_to_keep = 2
  return t


def check(t: ml_collections.ConfigDict) -> None:
  check_one_of("config.train.frozen_dtype", t.frozen_dtype, FROZEN_DTYPES)
  for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
    if t[name] < 1:
      raise UserError(f"config.train.{name} must be >= 1, got {t[name]}")
  if t.batch_size % t.grad_accum:
    raise UserError(f"config.train.batch_size ({t.batch_size}) must be a multiple of grad_accum ({t.grad_accum})")
  for name in COMPONENTS:
    if t.lr_mult[name] < 0:
      raise UserError(f"config.train.lr_mult.{name} must be >= 0")
