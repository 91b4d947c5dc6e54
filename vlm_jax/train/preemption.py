"""Stopping on a signal: every process stops after the same step, saves it, and exits 0.

Cloud TPU VMs (and batch schedulers) send SIGTERM shortly before a machine goes; Ctrl-C sends
SIGINT. On a slice each host gets its own signal at its own moment, so the first signal only
raises this process's flag, and an all-reduce of the flags (a scalar, dispatched after each step
and read one step later, so the host waits for nothing the next step does not need) tells every
process the same answer after the same step. All of them then save that step and exit.

A second signal ends the process at once (exit status 128 + signal), even while the main thread
is stuck in a collective that will never complete (a peer was killed): Python's C-level handler
writes every signal to the wakeup fd, and a watcher thread reads it there and exits; the
checkpoint being written is then left incomplete and the last complete one stays the latest.

Why not jax's own preemption sync point (multihost_utils.reached_preemption_sync_point): it hears
SIGTERM through its own C++ handler, which leaves no way to act on a second signal or on Ctrl-C,
and it exists only after jax.distributed.initialize (not on one host).
"""

import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("vlm_jax")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Installed for the duration of a run (`with StopSignal(mesh) as stop:`); `stop.agreed()` once
  after each step, on every process, says whether all processes stop after it."""

  def __init__(self, mesh: Mesh):
    self.signal_name: str | None = None
    self._seen = {"handler": 0, "watcher": 0}  # each path sees every signal once
    self._lock = threading.Lock()
    self._pending = None  # the all-reduce of the flags dispatched after the previous step
    if jax.process_count() > 1:
      self._flags_sharding = NamedSharding(mesh, P(mesh.axis_names))
      self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def __enter__(self) -> "StopSignal":
    self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
    self._read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._write_fd = write_fd
    self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, name="vlm_jax-signals", daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc) -> None:
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: one set outside Python
    os.close(self._write_fd)  # the watcher reads EOF and ends
    self._watcher.join(timeout=5)
    os.close(self._read_fd)

  def __bool__(self) -> bool:
    """This process got a signal (the loop acts on `agreed()`, which all processes share)."""
    return self.signal_name is not None

  def agreed(self) -> bool:
    """True on every process after the same step once any process got a signal. Call it once
    per step on every process (multi-process: it dispatches a collective)."""
    if jax.process_count() == 1:
      return bool(self)
    flag = np.full((1,), int(bool(self)), np.int32)
    sharding = self._flags_sharding
    shards = [jax.device_put(flag, d) for d in sharding.addressable_devices]
    flags = jax.make_array_from_single_device_arrays((sharding.mesh.size,), sharding, shards)
    previous, self._pending = self._pending, self._any(flags)
    return previous is not None and bool(previous)

  def _on_signal(self, signum: int, _frame) -> None:  # main thread, between bytecodes
    self._received(signum, "handler")

  def _watch(self) -> None:  # any moment, whatever the main thread is blocked in
    while data := os.read(self._read_fd, 64):
      for signum in data:
        if signum in SIGNALS:
          self._received(signum, "watcher")

  def _received(self, signum: int, path: str) -> None:
    name = signal.Signals(signum).name
    with self._lock:
      self._seen[path] += 1
      if self._seen[path] == 1:
        if self.signal_name is None:
          self.signal_name = name
          log.warning(
            "%s received: stopping after this step with a checkpoint (a second signal exits "
            "at once, keeping the last complete checkpoint)",
            name,
          )
        return
    os.write(2, f"second {name}: exiting now; the last complete checkpoint is kept\n".encode())
    os._exit(128 + signum)
