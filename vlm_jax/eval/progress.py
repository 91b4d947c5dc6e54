"""A progress bar on stderr: done/total, examples per second and ETA. On a terminal it redraws
one line; elsewhere (logs, CI) it writes a line at most every few seconds, and the last one."""

import sys
import time
from typing import TextIO


class ProgressBar:
  def __init__(self, label: str, stream: TextIO | None = None, every_s: float = 5.0, width: int = 24):
    # sys.stderr when called, not when imported: it may have been replaced since (notebooks, pytest).
    self.label, self.stream, self.every_s, self.width = label, stream or sys.stderr, every_s, width
    self.start = self.last = time.time()
    self.tty = self.stream.isatty()

  def __call__(self, done: int, total: int) -> None:
    now = time.time()
    if done < total and not self.tty and now - self.last < self.every_s:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (total - done) / rate if rate else 0.0
    filled = self.width * done // max(total, 1)
    line = (
      f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}  "
      f"{rate:.1f} examples/s  ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
    )
    end = "\n" if done >= total or not self.tty else ""
    self.stream.write(("\r" if self.tty else "") + line + end)
    self.stream.flush()
