"""XLA compiler options from config.xla, for jax.jit's `compiler_options`: a run's scheduling
choices live in its config (and its saved config.json), not in XLA_FLAGS / LIBTPU_INIT_ARGS.

The option names differ per compiler; each below was compiled with (libtpu for a v5e topology,
XLA's GPU options through the CPU compiler, which shares their DebugOptions). Values are spelled
as each parses them: libtpu's flags take true/false, XLA's DebugOptions only True/False.
"""

import logging
import re

import ml_collections

from vlm_jax.errors import UserError

LATENCY_HIDING = {
  "tpu": {"xla_tpu_enable_latency_hiding_scheduler": "true"},
  "gpu": {"xla_gpu_enable_latency_hiding_scheduler": "True"},
}
ASYNC_COLLECTIVES = {
  # MaxText's continuation fusion (benchmarks/xla_flags_library.py CF_FOR_ALL_GATHER,
  # CF_FOR_ALL_REDUCE), and its reduce-scatter pair (FSDP's gradients): collectives start early
  # and overlap the compute.
  "tpu": {
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_enable_async_all_gather": "true",
    "xla_enable_async_all_reduce": "true",
    "xla_enable_async_reduce_scatter_fusion": "true",
  },
  # GPU collectives are async by default (xla_gpu_enable_async_collectives is gone); their
  # stream is given priority over compute (NVIDIA JAX-Toolbox's GPU performance notes).
  "gpu": {"xla_gpu_enable_highest_priority_async_stream": "True"},
}
# Entries split at a comma followed by the next `name=`, so a value may be a list (A,B).
_ENTRY_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*=)")
_ENTRY = re.compile(r"\s*([A-Za-z_]\w*)=(.*)", re.DOTALL)


def parse_flags(text: str) -> dict[str, str]:
  """config.xla.flags, "name=value,name=value", -> {name: value}; "" -> {}."""
  if not text.strip():
    return {}
  out = {}
  for entry in _ENTRY_SPLIT.split(text):
    match = _ENTRY.fullmatch(entry)
    if not match:
      raise UserError(
        f"config.xla.flags: {entry.strip()!r} is not name=value (expected "
        "'name=value,name=value' with XLA option names, no leading --)"
      )
    out[match.group(1)] = match.group(2).strip()
  return out


def compiler_options(xla_cfg: ml_collections.ConfigDict, platform: str) -> dict[str, str]:
  """config.xla -> compiler options for `platform` ("tpu", "gpu", "cpu"); `flags` go as they are,
  after (and over) the switches' options."""
  options = {}
  if xla_cfg.latency_hiding_scheduler or xla_cfg.async_collectives:
    if platform in LATENCY_HIDING:
      if xla_cfg.latency_hiding_scheduler:
        options.update(LATENCY_HIDING[platform])
      if xla_cfg.async_collectives:
        options.update(ASYNC_COLLECTIVES[platform])
    else:
      logging.info(
        "config.xla.latency_hiding_scheduler and async_collectives are for TPU and GPU; nothing set on %s", platform
      )
  options.update(parse_flags(xla_cfg.flags))
  return options
