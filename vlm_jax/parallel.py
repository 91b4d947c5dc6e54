"""The mesh, the logical-axis rules (the one place names meet mesh axes), and sharding helpers."""

import logging
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlm_jax.config import BATCH_AXES, MESH_AXES, TENSOR_AXIS
from vlm_jax.errors import UserError

FSDP = BATCH_AXES[1]

# Parameters: weights are split over fsdp (ZeRO-3) on their embed side and over tensor on their
# heads/mlp/vocab side. Activations: batch over data x fsdp, heads/mlp over tensor.
RULES = (
  ("embed", FSDP),
  ("mlp", TENSOR_AXIS),
  ("heads", TENSOR_AXIS),
  ("kv_heads", TENSOR_AXIS),
  ("head_dim", None),
  ("vocab", TENSOR_AXIS),
  ("layers", None),
  ("act_batch", BATCH_AXES),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", TENSOR_AXIS),
  ("act_batch_kv_heads", (*BATCH_AXES, TENSOR_AXIS)),  # the KV cache's (row, kv head) dim
  ("act_mlp", TENSOR_AXIS),
  ("act_vocab", TENSOR_AXIS),
)
BATCH = P(BATCH_AXES)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh (data, fsdp, tensor) from config.mesh; -1 takes all remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [cfg[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise UserError(f"config.mesh.{axis}: size must be >= 1 or -1, got {size}")
  if sizes.count(-1) > 1:
    raise UserError("config.mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"config.mesh: {len(devices)} devices do not divide by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UserError(
      f"config.mesh: data x fsdp x tensor = {'x'.join(map(str, sizes))} = "
      f"{math.prod(sizes)} devices, but {len(devices)} are available"
    )
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def inference_mesh(devices=None) -> Mesh:
  """FSDP over every device, whatever mesh a run trained on: inference and conversion hold one
  copy of the params split over all devices."""
  return make_mesh(ml_collections.ConfigDict({axis: -1 if axis == FSDP else 1 for axis in MESH_AXES}), devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
  """Drops mesh axes from dims they do not divide (a small kv_heads, an odd vocab): replicate those."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      logging.info("replicating dim %d of %s (size %d) instead of splitting it %d ways", len(fitted), path, dim, size)
      fitted.append(None)
    else:
      fitted.append(axes)
  return P(*fitted)


def param_shardings(abstract_boxed_params, mesh: Mesh):
  """Boxed (logically annotated) abstract params -> tree of NamedShardings."""
  logical_specs = nn.get_partition_spec(abstract_boxed_params)
  mesh_specs = nn.logical_to_mesh(logical_specs, RULES)
  shapes = nn.meta.unbox(abstract_boxed_params)
  return jax.tree_util.tree_map_with_path(
    lambda path, spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh, jax.tree_util.keystr(path))),
    mesh_specs,
    shapes,
    is_leaf=lambda x: isinstance(x, P),
  )


def platform(mesh: Mesh) -> str:
  """ "tpu", "gpu" or "cpu": the mesh's devices' (libtpu's topology devices when compiling for a
  TPU from another machine)."""
  return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def whole_batch(rows: int, mesh: Mesh) -> int:
  """rows rounded up to a multiple of the batch shards (padded eval batches)."""
  return -(-rows // batch_divisor(mesh)) * batch_divisor(mesh)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Process-local rows (a dict of arrays, nested for AnyRes images) -> global arrays sharded
  over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), local)


def shardings_by_param_path(tree, param_shardings, params_abstract, mesh: Mesh):
  """Shardings for a tree whose leaves mirror params (optimizer moments, accumulators).

  A leaf whose key path ends with a param's path and has that param's shape gets the param's
  sharding; anything else (step counts, schedules' state) is replicated.
  """
  by_path = {}
  for (path, sharding), (_, x) in zip(
    jax.tree_util.tree_flatten_with_path(param_shardings)[0], jax.tree_util.tree_flatten_with_path(params_abstract)[0]
  ):
    by_path[tuple(path)] = (sharding, x.shape)

  def pick(path, leaf):
    for start in range(len(path)):
      hit = by_path.get(tuple(path[start:]))
      if hit and hit[1] == leaf.shape:
        return hit[0]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)
