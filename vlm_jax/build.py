"""Builds a run from a config: its task and model, param shardings, abstract params, eval step.

Shapes first (`eval_shape`), then shardings: every later array (init in train/trainer.py, a
restored or imported checkpoint) is created directly in its target sharding, so no full copy of
the model ever sits on one device. Training adds the optimizer on top (train/trainer.py);
inference, eval and conversion need only this.
"""

import contextlib
import dataclasses
import functools
import logging
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from vlm_jax import config as config_lib
from vlm_jax import parallel, tasks
from vlm_jax.data import anyres
from vlm_jax.errors import UserError
from vlm_jax.models import attention, lora, vlm

log = logging.getLogger("vlm_jax")


def validate(config: ml_collections.ConfigDict) -> None:
  """Everything a config can be checked for alone: its fields, its registry choices (task,
  bridge, ViT flavour, activations) and its AnyRes grids; one line naming the field."""
  config_lib.validate(config)
  tasks.task_of(config).check(config)
  if config.model.anyres.enabled:
    anyres.parse_pinpoints(config.model.anyres.grid_pinpoints, config.model.vision.image_size)


def resolve_model_config(config: ml_collections.ConfigDict, vocab_size: int, eos_id: int = -1) -> None:
  """Fills derived fields (vocab sizes and the text tower's end-of-text id from the tokenizer) in place."""
  # Only the task's own text tower: a run's saved config keeps the other's defaults (resume compares them).
  for name in ("text",) if config.task == "contrastive" else ("llm",):
    tower = config.model[name]
    if tower.vocab_size == 0:
      tower.vocab_size = vocab_size
    elif tower.vocab_size < vocab_size:
      raise UserError(
        f"config.model.{name}.vocab_size ({tower.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab_size})"
      )
  if config.task == "contrastive" and config.model.text.eos_id < 0:
    config.model.text.eos_id = eos_id


def path_str(path) -> str:
  """A param's key path as "llm/layers/q/kernel": what freezing, labels and key tables match."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def flat_params(tree) -> dict:
  """{"llm/layers/q/kernel": leaf, ...} of a params-shaped tree."""
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass
class Run:
  """What training, eval, inference and conversion share, built once per (config, mesh)."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  task: tasks.Task
  model: nn.Module
  param_shardings: object
  abstract_params: object
  init_params: Callable  # rng -> params from the model's initialisers, in their shardings
  eval_step: Callable  # (params, batch) -> {"loss_sum", "count"}
  # config.lora on: the plain model's Run (what init_from checkpoints and exports hold), and
  # plain params -> this model's (fresh adapters, base weights stored as lora.base_dtype says).
  base: "Run | None" = None
  adapt: Callable = lambda params: params
  # What the train step runs: the model, or with config.lora.dropout its adapters' dropout on
  # (qwix applies it whenever it is set, so eval and inference run `model`, without it).
  train_model: "nn.Module | None" = None

  def __post_init__(self):
    if self.train_model is None:
      self.train_model = self.model

  @property
  def plain(self) -> "Run":
    return self.base or self

  @property
  def image_tokens(self) -> int:
    return vlm.image_tokens(self.config.model)


def _quantization_blocks(model: nn.Module, inputs: tuple, lora_cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """QLoRA's block per adapted kernel (lora.quantization_blocks); the ones smaller than
  lora.block_size are logged."""
  if lora_cfg.base_dtype not in lora.QUANTIZED or not lora_cfg.block_size:
    return {}
  blocks = lora.quantization_blocks(model, inputs, lora_cfg)
  smaller = {path: b for path, b in blocks.items() if b != lora_cfg.block_size}
  if smaller:
    log.info(
      "QLoRA blocks: %d input rows a scale; smaller where %d does not divide the input: %s",
      lora_cfg.block_size,
      lora_cfg.block_size,
      ", ".join(f"{p} {b}" for p, b in smaller.items()),
    )
  return blocks


def build(config: ml_collections.ConfigDict, mesh: Mesh, image_token_id: int) -> Run:
  task = tasks.task_of(config)
  model = task.make_model(config, image_token_id)
  base = None
  if lora.enabled(config.lora):
    plain_config = config.copy_and_resolve_references()
    plain_config.lora.rank = 0
    base = build(plain_config, mesh, image_token_id)
    with attention.on_platform(parallel.platform(mesh)):
      blocks = _quantization_blocks(base.model, task.dummy_inputs(config, 1), config.lora)
    model, train_model = lora.wrap(model, config.lora, blocks=blocks), lora.wrap(model, config.lora, True, blocks)
  inputs = task.dummy_inputs(config, 1)
  masters = lora.fp32_masters if base else (lambda params: params)
  boxed_init = lambda rng: masters(model.init(rng, *inputs)["params"])
  with attention.on_platform(parallel.platform(mesh)):
    boxed = jax.eval_shape(boxed_init, jax.random.key(0))
  if base:
    paths = list(flat_params(nn.meta.unbox(boxed)))
    lora.check_targets(config.lora, paths)
  param_shardings = parallel.param_shardings(boxed, mesh)

  def eval_step(params, batch: dict) -> dict[str, jax.Array]:
    loss_sum, count = task.loss(model.apply, params, batch)
    return {"loss_sum": loss_sum, "count": count}

  with tracing_context(mesh):
    init_params = jax.jit(lambda rng: nn.meta.unbox(boxed_init(rng)), out_shardings=param_shardings)
    eval_step = jax.jit(
      eval_step, in_shardings=(param_shardings, parallel.batch_sharding(mesh)), out_shardings=parallel.replicated(mesh)
    )
  # qwix creates adapters with their kernel's logical names, which it applies to the adapter's
  # shape while a mesh is set (a rank error): LoRA inits trace without one, their placement
  # coming from out_shardings alone.
  init_context = _without_mesh if base else in_mesh
  run = Run(
    config,
    mesh,
    task,
    model,
    param_shardings,
    nn.meta.unbox(boxed),
    init_context(init_params, mesh),
    in_mesh(eval_step, mesh),
  )
  if base:
    attach = _without_mesh(
      jax.jit(
        lambda params, rng: lora.attach(params, nn.meta.unbox(boxed_init(rng))),
        out_shardings=param_shardings,
        donate_argnums=0,
      ),
      mesh,
    )
    run.base, run.adapt, run.train_model = base, lambda params: attach(params, jax.random.key(config.seed)), train_model
  return run


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """Calls (and so traces) a jitted `fn` with the mesh, the logical rules and the mesh's platform
  (attention.on_platform) in context."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with tracing_context(mesh):
      return fn(*args, **kwargs)

  wrapped.lower = lambda *a, **k: _lower(fn, mesh, *a, **k)
  return wrapped


def _lower(fn, mesh, *args, **kwargs):
  with tracing_context(mesh):
    return fn.lower(*args, **kwargs)


def _without_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """Like in_mesh, without setting the mesh (for the LoRA inits above)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.logical_axis_rules(parallel.RULES), attention.on_platform(parallel.platform(mesh)):
      return fn(*args, **kwargs)

  return wrapped


@contextlib.contextmanager
def tracing_context(mesh: Mesh):
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES), attention.on_platform(parallel.platform(mesh)):
    yield
