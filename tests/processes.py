"""`vlm-jax train` in local processes: one, or several joined over gloo CPU collectives as the
hosts of a slice would be; their stderr read while they run (to signal them at a given step)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py")
# A model that compiles in seconds; fp32 so that runs can be compared tightly.
TINY = [
  "--config.model.dtype=float32",
  "--config.model.vision.image_size=32",
  "--config.model.vision.patch_size=8",
  "--config.model.vision.width=32",
  "--config.model.vision.depth=1",
  "--config.model.vision.mlp_dim=64",
  "--config.model.llm.width=32",
  "--config.model.llm.mlp_dim=64",
  "--config.model.llm.head_dim=8",
  "--config.train.batch_size=8",
  "--config.train.steps=4",
  "--config.train.warmup_steps=0",
  "--config.train.log_every=1",
  "--config.train.eval_every=4",
  "--config.train.checkpoint_every=2",
  "--config.train.eval_examples=8",
  "--config.train.eval_batch_size=8",
  "--config.mesh.data=-1",
]


# Tests compare results, never speed, and both sides of every equivalence run under the same
# flags, so every test process compiles LLVM at -O0 (~2.5x faster to compile). XLA:CPU's older
# fusion emitters (--xla_cpu_use_fusion_emitters=false) would halve the rest of the backend time,
# but they round a sharded init and a jitted gradient differently from the unsharded and eager
# ones, which tests compare bit for bit.
FAST_COMPILE = "--xla_backend_optimization_level=0"

# Transparent huge pages from glibc's malloc (docs/performance.md "Huge pages on CPU"): XLA:CPU allocates a
# program's temporaries at every call (190 MiB a step for the default config), and the kernel
# zeroes the fresh pages 4 KiB at a time; a long training run is ~15% faster with them. Only such
# runs get it: compile-bound test processes were 8-15% slower (tests/test_bridges.py).
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test process with `devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
  """`vlm-jax ARGS` in this process (its 8 CPU devices): exit status and what it printed."""
  from vlm_jax import cli  # not at import: conftest imports this module before jax may be

  capsys.readouterr()  # what came before is not this command's
  code = cli.main(list(args))
  out = capsys.readouterr()
  return subprocess.CompletedProcess(["vlm-jax", *args], code, out.out, out.err)


def cli_process(
  *args: str, xla_flags: str = "", platforms: str = "cpu", timeout: int = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
  """`vlm-jax ARGS` from a shell, in a process of its own. XLA_FLAGS `xla_flags` ("": one CPU
  device at XLA's default optimization, as a user runs it); JAX_PLATFORMS `platforms`; `env` added."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS=platforms, **(env or {}))
  return subprocess.run(
    [sys.executable, "-m", "vlm_jax.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
  )


def vlm_jax_cli(*args: str) -> subprocess.CompletedProcess:
  """`vlm-jax ARGS` as a user runs it (cli_process: a run of hundreds of steps computes ~2.8x
  faster than at the tests' -O0), with huge pages; it must exit 0."""
  result = cli_process(*args, env={"GLIBC_TUNABLES": HUGE_PAGES})
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Train:
  """`vlm-jax train --config shapes_tiny TINY... args` over `devices` CPU devices split evenly
  across `processes` processes; `lines[i]` is process i's stderr so far."""

  def __init__(self, workdir: str, processes: int = 1, args=(), devices: int = 8):
    argv = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", CONFIG, "--workdir", workdir, *TINY, *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices // processes))
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    self.procs = [
      subprocess.Popen(
        argv,
        cwd=ROOT,
        env=dict(env, JAX_PROCESS_ID=str(i)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
      )
      for i in range(processes)
    ]
    self.lines: list[list[str]] = [[] for _ in self.procs]
    self._readers = [
      threading.Thread(target=lambda p=p, out=out: out.extend(p.stderr), daemon=True)
      for p, out in zip(self.procs, self.lines)
    ]
    for r in self._readers:
      r.start()

  def wait_for_step(self, step: int, process: int = 0, timeout: float = 300) -> None:
    """Until process `process` has logged step >= `step`."""
    pattern = re.compile(r"step (\d+)/")
    self._wait(
      lambda line: (m := pattern.search(line)) is not None and int(m.group(1)) >= step, f"step {step}", process, timeout
    )

  def wait_for_line(self, text: str, process: int = 0, timeout: float = 60) -> None:
    """Until process `process` has logged a line holding `text`."""
    self._wait(lambda line: text in line, repr(text), process, timeout)

  def _wait(self, seen, what: str, process: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if any(seen(line) for line in list(self.lines[process])):
        return
      if self.procs[process].poll() is not None:
        raise AssertionError(f"process {process} ended before {what}:\n{self.stderr(process)[-3000:]}")
      time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s:\n{self.stderr(process)[-3000:]}")

  def signal(self, process: int, sig: int = signal.SIGTERM) -> None:
    self.procs[process].send_signal(sig)

  def wait(self, timeout: float = 600) -> list[int]:
    """The processes' exit statuses."""
    codes = [p.wait(timeout=timeout) for p in self.procs]
    for r in self._readers:
      r.join(timeout=10)
    return codes

  def stderr(self, process: int = 0) -> str:
    return "".join(self.lines[process])

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    self.wait()


def train(workdir: str, processes: int = 1, args=(), devices: int = 8) -> list[str]:
  """Runs to the end; every process must exit 0. Returns their stderr."""
  run = Train(workdir, processes, args, devices)
  codes = run.wait()
  for i, code in enumerate(codes):
    assert code == 0, run.stderr(i)[-3000:]
  return [run.stderr(i) for i in range(processes)]


def metrics(workdir: str) -> dict[int, dict]:
  out: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row.pop("step"), {}).update(row)
  return out


def config(args=()):
  """The config `train(..., args)` runs, for the same run in this process (api.train)."""
  from vlm_jax import cli, config as config_lib

  _, overrides = cli.split_overrides([*TINY, *args])
  cfg = config_lib.load_file(CONFIG)
  config_lib.apply_overrides(cfg, overrides)
  return cfg
