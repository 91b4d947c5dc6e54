"""A run's train state: what trains (labels), the optimizer, state shardings, jitted init and step."""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlm_jax import build as build_lib
from vlm_jax import parallel, xla_options
from vlm_jax.models import lora
from vlm_jax.train import optim, step as step_lib


@dataclasses.dataclass
class Trainer:
  """Built once per (config, mesh) on top of a build.Run."""

  run: build_lib.Run
  labels: object  # tree of optim labels (component or FROZEN)
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict
  init: Callable  # rng -> state (sharded): the model's initial params, a fresh optimizer
  start: Callable  # plain params (config.model.init_from; donated) -> state, fresh optimizer (and adapters)
  train_step: Callable  # (state, batch) -> (state, metrics); donates state


def make(run: build_lib.Run) -> Trainer:
  config, mesh = run.config, run.mesh
  labels = optim.param_labels(run.abstract_params, config.train, config.stage)
  tx = optim.make_optimizer(config.train, labels)

  frozen_dtype = jnp.dtype(config.train.frozen_dtype)

  def new_state(params):
    # (QLoRA's quantized kernels keep their codes and compute-dtype scales.)
    params = jax.tree.map(
      lambda p, label: p.astype(frozen_dtype) if label == optim.FROZEN and not lora.is_quantized(p) else p,
      params,
      labels,
      is_leaf=lora.is_quantized,
    )
    params = lora.store_base(params, config.lora)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(new_state, run.abstract_params)
  replicated = parallel.replicated(mesh)
  opt_shardings = parallel.shardings_by_param_path(
    abstract_state["opt_state"], run.param_shardings, run.abstract_params, mesh
  )
  state_shardings = {"step": replicated, "params": run.param_shardings, "opt_state": opt_shardings}

  def loss(params, batch, rng):
    return run.task.loss(functools.partial(run.train_model.apply, rngs={"dropout": rng}), params, batch)

  train_step = functools.partial(
    step_lib.train_step,
    loss=loss,
    seed=config.seed,
    tx=tx,
    labels=labels,
    grad_accum=config.train.grad_accum,
    lr_fn=optim.schedule(config.train),
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    # The given params become the state's (donated: never two copies of the model at once).
    start = jax.jit(new_state, out_shardings=state_shardings, donate_argnums=0)
    train_step = jax.jit(
      train_step,
      in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
      compiler_options=xla_options.compiler_options(config.xla, parallel.platform(mesh)),
    )
  start = build_lib.in_mesh(start, mesh)
  return Trainer(
    run,
    labels,
    tx,
    state_shardings,
    abstract_state,
    lambda rng: start(run.init_params(rng)),
    lambda params: start(run.adapt(params)),
    build_lib.in_mesh(train_step, mesh),
  )


def build(config: ml_collections.ConfigDict, mesh: Mesh, image_token_id: int) -> Trainer:
  return make(build_lib.build(config, mesh, image_token_id))
