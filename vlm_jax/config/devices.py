"""config.mesh and config.xla: how the step is laid out over the devices and scheduled, not what it computes."""

import ml_collections

from vlm_jax import xla_options


# The mesh's axes, in order (config.mesh gives their sizes): the batch is split over data x fsdp,
# weights over fsdp (ZeRO-3) and tensor (vlm_jax/parallel.py RULES).
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = MESH_AXES[:2]
TENSOR_AXIS = MESH_AXES[2]


def mesh_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(zip(MESH_AXES, (-1, 1, 1))))


def xla_defaults() -> ml_collections.ConfigDict:
  # XLA compiler options (vlm_jax/xla_options.py), how the step is scheduled, not what it computes.
  # The switches are for TPU and GPU; `flags`, "name=value,name=value", go to the compiler as they
  # are (TPU: true/false; GPU: True/False).
  return ml_collections.ConfigDict(dict(latency_hiding_scheduler=False, async_collectives=False, flags=""))


def check_xla(xla: ml_collections.ConfigDict) -> None:
  xla_options.parse_flags(xla.flags)
