import os
import shutil
import tempfile

import processes

# 8 simulated CPU devices for every test process, compiled for speed of compiling
# (processes.xla_flags); must be set before jax is imported. Subprocesses the tests start set
# their own device count with the same flags.
os.environ.setdefault("XLA_FLAGS", processes.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No Python tracebacks in the compiled programs' debug locations (what a profiler shows as an op's
# source line; no test reads them): tracing and compiling are ~10% faster (tests/test_bridges.py:
# task-clock 61 -> 51 s). Subprocesses inherit it.
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")

# One persistent compilation cache for the whole run: the pytest workers and every process a test
# starts (they inherit this environment) reuse what another one compiled; the cache key holds the
# program, the flags and the devices, so a hit is the executable XLA would have built. Compiles
# under a second are kept too (the default skips them): most of the suite's are.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _CACHE_OWNER:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlm-jax-tests-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
  if _CACHE_OWNER:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The files whose tests run longest, started first: README's test command runs two pytest workers,
# each taking whole files in this order (--no-loadscope-reorder: xdist would otherwise put the
# files with the most tests first), so the long ones overlap instead of ending the run alone.
SLOW_FIRST = ("test_e2e.py", "test_lora.py", "test_preemption.py", "test_multihost.py", "test_compile.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order
