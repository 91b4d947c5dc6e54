import os

# 8 simulated CPU devices for every test process; must be set before jax is imported.
# LLVM at -O0 compiles ~2.5x faster; tests compare results, never speed, and both sides of every
# equivalence run under the same flags. Subprocess tests (CLI, e2e) set their own XLA_FLAGS.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
