import os

# 8 simulated CPU devices for every test process; must be set before jax is imported.
# LLVM at -O0 compiles ~2.5x faster; tests compare results, never speed, and both sides of every
# equivalence run under the same flags. Subprocess tests (CLI, e2e) set their own XLA_FLAGS.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The files whose tests run longest, started first: README's test command runs two pytest workers,
# each taking whole files in this order (--no-loadscope-reorder: xdist would otherwise put the
# files with the most tests first), so the long ones overlap instead of ending the run alone.
SLOW_FIRST = ("test_e2e.py", "test_lora.py", "test_preemption.py", "test_multihost.py", "test_compile.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order
