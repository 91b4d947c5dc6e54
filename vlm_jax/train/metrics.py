"""Metrics out: DIR/metrics.jsonl, TensorBoard events (no TensorFlow), and the console progress line."""

import json
import sys
import time

from etils import epath

from vlm_jax.files import AppendFile, as_path


# tensorboardX imports torch when it is installed, only to accept torch tensors (we log floats):
# hidden from it, a run starts 1.6 s sooner where transformers' torch is installed.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
try:
  from tensorboardX import SummaryWriter, record_writer
finally:
  if _HIDE_TORCH:
    del sys.modules["torch"]


class _EventFiles:
  """TensorBoard event files in object stores through the same path layer as the rest."""

  def open(self, path: str) -> AppendFile:
    return AppendFile(epath.Path(path))

  def directory_check(self, path: str) -> None:
    pass  # object stores have no directories


for _scheme in ("gs", "s3"):
  record_writer.register_writer_factory(_scheme, _EventFiles())


class MetricWriter:
  """Appends {"step": s, name: value, ...} lines; mirrors scalars to DIR/tensorboard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      root = as_path(workdir)
      self._jsonl = AppendFile(root / "metrics.jsonl")
      self._tb = SummaryWriter(str(root / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write((json.dumps({"step": step, **metrics}) + "\n").encode())
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class ProgressLine:
  """Throughput since the last log, and ETA from the average step time of this process."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.first_step, self.first_time = start_step, time.time()
    self.last_step, self.last_time = start_step, self.first_time

  def update(self, step: int, tokens_per_step: int) -> float:
    now = time.time()
    rate = (step - self.last_step) * tokens_per_step / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def line(self, step: int, metrics: dict[str, float]) -> str:
    per_step = (self.last_time - self.first_time) / max(step - self.first_step, 1)
    eta = per_step * (self.total - step)
    return (
      f"step {step}/{self.total}  loss {metrics['train/loss']:.4f}  "
      f"lr {metrics['train/lr']:.2e}  {metrics['train/tokens_per_s']:,.0f} tok/s  "
      f"ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
