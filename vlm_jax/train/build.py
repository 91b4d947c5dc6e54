"""Builds what a run needs from a config: model, optimizer, state shardings, jitted init and steps.

Shapes first (`eval_shape`), then shardings, then a jitted init that creates every array directly
in its target sharding: no full copy of the model ever sits on one device.
"""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.data.anyres_batch import spec_from_config
from vlm_jax.errors import UserError
from vlm_jax.models.vlm import VLM, image_tokens
from vlm_jax.train import optim, step as step_lib


def resolve_model_config(config: ml_collections.ConfigDict, vocab_size: int) -> None:
  """Fills derived fields (vocab size from the tokenizer) in place."""
  llm = config.model.llm
  if llm.vocab_size == 0:
    llm.vocab_size = vocab_size
  elif llm.vocab_size < vocab_size:
    raise UserError(f"config.model.llm.vocab_size ({llm.vocab_size}) is smaller than the tokenizer's "
                    f"vocabulary ({vocab_size})")


def make_model(config: ml_collections.ConfigDict, image_token_id: int) -> VLM:
  return VLM(config.model, image_token_id)


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> tuple[jax.Array, ...]:
  v, length = config.model.vision, config.data.seq_len
  images = jnp.zeros((batch, 1, v.image_size, v.image_size, 3), jnp.float32)
  if config.model.anyres.enabled:  # one group, one tile: shapes do not matter to init
    taps = spec_from_config(config.model).taps
    images = {"tiles": jnp.zeros((1, 1, v.image_size, v.image_size, 3), jnp.float32),
              "index": jnp.zeros((batch, length, taps), jnp.int32),
              "weight": jnp.zeros((batch, length, taps), jnp.float32)}
  return (jnp.zeros((batch, length), jnp.int32), images,
          jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32))


@dataclasses.dataclass
class Run:
  """Everything the loop, the tests and inference need, built once per (config, mesh)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: VLM
  labels: object                 # tree of optim labels (component or FROZEN)
  tx: optax.GradientTransformation
  param_shardings: object
  state_shardings: dict
  abstract_state: dict
  init: Callable                 # rng -> state (sharded)
  train_step: Callable           # (state, batch) -> (state, metrics); donates state
  eval_step: Callable            # (params, batch) -> {"loss_sum", "count"}

  @property
  def image_tokens(self) -> int:
    return image_tokens(self.config.model)


def build(config: ml_collections.ConfigDict, mesh: Mesh, image_token_id: int) -> Run:
  model = make_model(config, image_token_id)
  inputs = dummy_inputs(config)
  init_params = lambda rng: model.init(rng, *inputs)["params"]
  boxed = jax.eval_shape(init_params, jax.random.key(0))
  param_shardings = parallel.param_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)
  labels = optim.param_labels(abstract_params, config.train, config.stage)
  tx = optim.make_optimizer(config.train, labels)

  def init_state(rng):
    params = nn.meta.unbox(init_params(rng))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  replicated = parallel.replicated(mesh)
  opt_shardings = parallel.shardings_by_param_path(abstract_state["opt_state"], param_shardings,
                                                   abstract_params, mesh)
  state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
  batch_sharding = parallel.batch_sharding(mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    init = jax.jit(init_state, out_shardings=state_shardings)
    if config.model.init_from:
      init = _init_from(config.model.init_from, config.model, tx, abstract_params, state_shardings)
    train_step = jax.jit(
        functools.partial(step_lib.train_step, apply_fn=model.apply, tx=tx, labels=labels,
                          grad_accum=config.train.grad_accum, lr_fn=optim.schedule(config.train)),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
        donate_argnums=0)
    eval_step = jax.jit(functools.partial(step_lib.eval_step, apply_fn=model.apply),
                        in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
  return Run(config, mesh, model, labels, tx, param_shardings, state_shardings, abstract_state,
             _in_mesh(init, mesh), _in_mesh(train_step, mesh), _in_mesh(eval_step, mesh))


def _init_from(path: str, model_cfg, tx, abstract_params, state_shardings) -> Callable:
  """init for a fresh run whose params come from a checkpoint or a HF LLaVA directory (e.g. one
  `vlm-jax convert --vision` assembled for stage 1); the optimizer state starts fresh."""
  from vlm_jax.train.checkpoint import load_params
  start = jax.jit(lambda params: {"step": jnp.zeros((), jnp.int32), "params": params,
                                  "opt_state": tx.init(params)},
                  out_shardings=state_shardings)

  def init(rng):
    del rng  # nothing is random: the params are given
    return start(load_params(path, model_cfg, abstract_params, state_shardings["params"]))
  return init


def _in_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """Calls (and so traces) `fn` with the mesh and the logical rules in context."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
      return fn(*args, **kwargs)
  wrapped.lower = lambda *a, **k: _lower(fn, mesh, *a, **k)
  return wrapped


def _lower(fn, mesh, *args, **kwargs):
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    return fn.lower(*args, **kwargs)
