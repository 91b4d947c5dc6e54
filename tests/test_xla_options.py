"""config.xla -> compiler options: the mapping per platform, the flags parser, and libtpu accepting
the TPU options (compiled for a v5e topology, on any machine)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import config as config_lib
from vlm_jax import xla_options
from vlm_jax.errors import UserError


def _xla(latency_hiding_scheduler=False, async_collectives=False, flags=""):
  c = config_lib.base().xla
  c.update(dict(latency_hiding_scheduler=latency_hiding_scheduler, async_collectives=async_collectives, flags=flags))
  return c


@pytest.mark.parametrize("platform", ["tpu", "gpu", "cpu"])
def test_nothing_set_by_default(platform):
  assert xla_options.compiler_options(_xla(), platform) == {}


def test_tpu_options():
  lhs = xla_options.compiler_options(_xla(latency_hiding_scheduler=True), "tpu")
  assert lhs == {"xla_tpu_enable_latency_hiding_scheduler": "true"}
  both = xla_options.compiler_options(_xla(True, True), "tpu")
  assert both == {**lhs, **xla_options.ASYNC_COLLECTIVES["tpu"]}
  assert both["xla_tpu_enable_async_collective_fusion_fuse_all_gather"] == "true"


def test_gpu_options():
  assert xla_options.compiler_options(_xla(True, True), "gpu") == {
    "xla_gpu_enable_latency_hiding_scheduler": "True",
    "xla_gpu_enable_highest_priority_async_stream": "True",
  }


def test_cpu_gets_only_the_flags_and_says_why(caplog):
  with caplog.at_level(logging.INFO):
    options = xla_options.compiler_options(_xla(True, True, "xla_backend_optimization_level=0"), "cpu")
  assert options == {"xla_backend_optimization_level": "0"}
  assert "for TPU and GPU" in caplog.text


def test_flags_go_as_they_are_and_over_the_switches():
  flags = "xla_enable_async_all_gather=false, xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER"
  options = xla_options.compiler_options(_xla(async_collectives=True, flags=flags), "tpu")
  assert options["xla_enable_async_all_gather"] == "false"
  assert options["xla_gpu_disable_async_collectives"] == "ALLREDUCE,ALLGATHER"  # a list value keeps its commas
  assert options["xla_tpu_overlap_compute_collective_tc"] == "true"


def test_gpu_option_names_and_values_are_xlas():
  # The CPU compiler parses XLA's DebugOptions, the GPU options among them; it rejects 'true'.
  options = xla_options.compiler_options(_xla(True, True), "gpu")
  jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4))).compile(compiler_options=options)


@pytest.mark.parametrize("flags", ["xla_foo", "--xla_foo=true", "=1", "xla foo=1"])
def test_bad_flags_name_the_field(flags):
  with pytest.raises(UserError, match=r"config\.xla\.flags"):
    xla_options.parse_flags(flags)
  config = config_lib.base()
  config_lib.apply_overrides(config, {"xla.flags": flags})
  with pytest.raises(UserError, match=r"config\.xla\.flags"):
    config_lib.validate(config)


def test_libtpu_accepts_the_tpu_options(monkeypatch):
  from jax.experimental import topologies  # libtpu: the test extra's jax[tpu]

  # Only a description of the chips is used: another process holding libtpu must not fail this.
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.array(devices), ("x",))
  x, w = (jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("x"))) for _ in range(2))
  lowered = jax.jit(lambda x, w: jnp.tanh(x @ w.T) @ w, out_shardings=NamedSharding(mesh, P())).lower(x, w)
  options = xla_options.compiler_options(_xla(True, True), "tpu")
  assert "all-gather" in lowered.compile(compiler_options=options).as_text()
  with pytest.raises(Exception, match="No such compile option"):  # so names are checked, not ignored
    lowered.compile(compiler_options={"xla_tpu_no_such_option": "true"})
