"""Preemption and elastic resume.

A signal's stop step is always on disk; every process of a run stops at the same step; a second
signal exits at once; a run continues on another mesh or process count and ends on the unbroken
run's loss. Also: each save's stall is reported, and a workdir that cannot be written is one line
before anything is written.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest

import helpers
import processes
from vlm_jax import api, parallel
from vlm_jax.build import resolve_model_config
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import loop

STEPS, EVERY = 8, 3  # periodic checkpoints at 3 and 6
# Continuing on another mesh or process count changes the reduction order only.
ELASTIC = ["--config.train.steps=40", "--config.train.checkpoint_every=20", "--config.train.eval_every=1000"]
ELASTIC_RTOL = 1e-5  # seen: 1.1e-7 on (2,2,2); 0 on one device and from 2 processes to 1


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def _config(tok, overrides=None):
  cfg = helpers.tiny_config(
    {
      "mesh.data": -1,
      "data.seq_len": 64,
      "train.steps": STEPS,
      "train.checkpoint_every": EVERY,
      "train.log_every": 1,
      **(overrides or {}),
    }
  )
  resolve_model_config(cfg, tok.vocab_size)
  return cfg


@dataclasses.dataclass
class Probe:
  """A periodic eval that sends this process SIGTERM while it evaluates, when armed."""

  armed: bool = False
  name: str = "probe"
  every: int = 4

  def evaluate(self, params) -> dict:
    if self.armed:
      signal.raise_signal(signal.SIGTERM)  # handled before it returns: no wait needed
    return {"params": float(sum(x.size for x in jax.tree.leaves(params)))}


def _train(tok, workdir, probe=None):
  return loop.train(_config(tok), workdir, evals=lambda run, tokenizer: [probe or Probe()])


def _latest(workdir) -> int | None:
  checkpoints = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    return checkpoints.latest_step()
  finally:
    checkpoints.close()


@pytest.fixture(scope="module")
def unbroken(tok, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("unbroken"))
  _train(tok, workdir)
  return processes.metrics(workdir)


def _signal_on_call(monkeypatch, owner, name: str, call: int) -> None:
  """SIGTERM to this process when owner.name is called for the call-th time (after the call)."""
  original, calls = getattr(owner, name), []

  def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == call:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(owner, name, wrapped)


# moment -> the step the run stops at. The loop reads the signal once per step, after dispatching it.
MOMENTS = {
  "right after a periodic save": 4,  # checkpoints.save's first call is step 3's
  "mid-step": 5,  # the 5th batch is fetched while step 4 computes
  "during eval": 5,  # the probe evaluates at step 4
  "just before a periodic save": 6,  # signalled while step 5 computes: stops at periodic step 6
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_stops_the_run_with_the_announced_step_on_disk(tok, unbroken, moment, tmp_path, monkeypatch, caplog):
  workdir, expected = str(tmp_path / "run"), MOMENTS[moment]
  if moment == "right after a periodic save":
    _signal_on_call(monkeypatch, checkpoint_lib.Checkpointer, "save", 1)
  elif moment == "mid-step":
    _signal_on_call(monkeypatch, parallel, "global_batch", 5)
  elif moment == "just before a periodic save":
    _signal_on_call(monkeypatch, parallel, "global_batch", 6)
  with caplog.at_level(logging.INFO, logger="vlm_jax"):
    _train(tok, workdir, Probe(armed=moment == "during eval"))
  assert re.findall(r"stopped at step (\d+) on SIGTERM", caplog.text) == [str(expected)]
  assert _latest(workdir) == expected  # announced, complete and the latest
  stopped = processes.metrics(workdir)
  assert max(stopped) == expected
  monkeypatch.undo()
  _train(tok, workdir)  # resumes
  resumed = processes.metrics(workdir)
  for step in range(1, STEPS + 1):
    assert resumed[step]["train/loss"] == unbroken[step]["train/loss"], step
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the run


def test_each_save_reports_its_stall(unbroken):
  """Saves are asynchronous: the loop is held only for the copy off the devices (the figure on the
  default config is in the README); the last save is complete before the run returns."""
  saves = sorted(step for step, row in unbroken.items() if "checkpoint/stall_ms" in row)
  assert saves == [EVERY, 2 * EVERY, STEPS]
  assert all(unbroken[s]["checkpoint/stall_ms"] >= 0 for s in saves)


# --- Elastic: another mesh, another process count ------------------------------------------------
@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
  """The unbroken 40 steps on (8,1,1), and a run stopped at 20 on (8,1,1)."""
  root = tmp_path_factory.mktemp("elastic")
  unbroken_dir, stopped = str(root / "unbroken"), str(root / "stopped")
  api.train(processes.config(ELASTIC), unbroken_dir)
  api.train(processes.config(ELASTIC), stopped, stop_after=20)
  return processes.metrics(unbroken_dir), stopped


def _assert_ends_like(metrics: dict, unbroken: dict) -> None:
  assert max(metrics) == max(unbroken) == 40
  np.testing.assert_allclose(metrics[40]["train/loss"], unbroken[40]["train/loss"], rtol=ELASTIC_RTOL)


def test_a_run_continues_on_another_mesh(elastic, tmp_path, caplog):
  unbroken, stopped = elastic
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  with caplog.at_level(logging.INFO, logger="vlm_jax"):
    api.train(
      processes.config([*ELASTIC, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]), workdir
    )
  assert "resumed from step 20" in caplog.text
  assert "runs through jit" not in caplog.text  # the step compiled before the loop is the one that runs
  for change in ("mesh.data: -1 -> 2", "mesh.fsdp: 1 -> 2", "mesh.tensor: 1 -> 2"):
    assert change in caplog.text  # the log says what changed
  _assert_ends_like(processes.metrics(workdir), unbroken)


def test_a_run_continues_on_one_device(elastic, tmp_path):
  unbroken, stopped = elastic
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  [log] = processes.train(workdir, 1, ELASTIC, devices=1)
  assert "resumed from step 20 on 1 process(es) x 1 devices" in log
  _assert_ends_like(processes.metrics(workdir), unbroken)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(elastic, tmp_path):
  """SIGTERM to process 1 only: both save the same step and exit 0; the run then ends on the
  unbroken run's loss, continued on 2 processes x 4 devices or on 1 x 8."""
  unbroken, _ = elastic
  workdir = str(tmp_path / "two")
  run = processes.Train(workdir, 2, ELASTIC)
  try:
    run.wait_for_step(8)
    run.signal(1)
    codes = run.wait(timeout=60)  # both exit within a minute: a stop, not a hang
  finally:
    run.kill()
  assert codes == [0, 0], (run.stderr(0)[-2000:], run.stderr(1)[-2000:])
  stops = [re.findall(r"stopped at step (\d+) on (SIGTERM|a peer's signal)", run.stderr(i)) for i in range(2)]
  assert len(stops[0]) == len(stops[1]) == 1 and stops[0][0][0] == stops[1][0][0], stops
  assert (stops[0][0][1], stops[1][0][1]) == ("a peer's signal", "SIGTERM")
  step = int(stops[0][0][0])
  assert 8 <= step < 40 and _latest(workdir) == step
  on_one = str(tmp_path / "one")
  shutil.copytree(workdir, on_one)
  processes.train(workdir, 2, ELASTIC)
  _assert_ends_like(processes.metrics(workdir), unbroken)
  [log] = processes.train(on_one, 1, ELASTIC)
  assert f"data: 2 processes' positions continued on 1: from global sample {8 * step} (exact)" in log
  _assert_ends_like(processes.metrics(on_one), unbroken)


def test_a_second_signal_exits_at_once_while_a_collective_waits(tmp_path):
  """Process 1 frozen (SIGSTOP): process 0 waits in a collective for ever. Its first SIGTERM can
  only ask for a stop; the second ends it within seconds, and the last complete checkpoint stays."""
  workdir = str(tmp_path / "run")
  run = processes.Train(workdir, 2, [*ELASTIC, "--config.train.steps=10000", "--config.train.checkpoint_every=5"])
  try:
    run.wait_for_step(7)
    run.signal(1, signal.SIGSTOP)  # from here on, every collective process 0 enters waits for ever
    run.signal(0)
    run.wait_for_line("SIGTERM received: stopping after this step")
    with pytest.raises(subprocess.TimeoutExpired):  # the first signal cannot end the step process 0 waits in
      run.procs[0].wait(timeout=1)
    run.signal(0)
    code = run.procs[0].wait(timeout=10)  # the second ends it within seconds
  finally:
    run.signal(1, signal.SIGKILL)
    run.kill()
  assert code == 128 + signal.SIGTERM, run.stderr(0)[-2000:]
  assert "second SIGTERM: exiting now" in run.stderr(0)
  latest = _latest(workdir)
  assert latest is not None and latest % 5 == 0 and latest >= 5


# --- Workdirs that cannot be written -------------------------------------------------------------
@pytest.mark.parametrize(
  "layout,where",
  [
    ({"run": "a file"}, "run"),  # the workdir is a file
    ({"parent": "a file"}, "parent"),  # ... a file above it
    ({"run/checkpoints": "a file"}, "run/checkpoints"),  # a file where a directory belongs
    ({"run/tensorboard": "a file"}, "run/tensorboard"),
    ({"run/metrics.jsonl/x": "a file"}, "run/metrics.jsonl"),  # a directory where a file belongs
  ],
)
def test_a_workdir_in_the_way_is_one_line_and_nothing_is_written(tok, tmp_path, layout, where):
  for name, text in layout.items():
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_text(text)
  before = helpers.workdir_files(tmp_path)
  workdir = tmp_path / ("parent/run" if "parent" in layout else "run")
  with pytest.raises(UserError, match=re.escape(str(tmp_path / where))):
    _train(tok, str(workdir))
  assert helpers.workdir_files(tmp_path) == before


def _read_only(path) -> None:
  """chmod 555; as root (which chmod does not stop) the immutable attribute as well."""
  os.chmod(path, 0o555)
  if os.access(path, os.W_OK) and os.geteuid() == 0:
    subprocess.run(["chattr", "+i", str(path)], check=True)


def test_a_read_only_workdir_is_one_line_exit_2_and_left_as_it_was(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  _read_only(workdir)
  try:
    with pytest.raises(OSError):
      (workdir / "probe").write_text("")  # the directory is read-only indeed
    result = processes.cli_process(
      "train",
      "--config",
      processes.CONFIG,
      "--workdir",
      str(workdir),
      *processes.TINY,
      xla_flags=processes.xla_flags(8),
    )
  finally:
    subprocess.run(["chattr", "-i", str(workdir)], capture_output=True)
    os.chmod(workdir, 0o755)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(workdir) in lines[0] and "cannot write" in lines[0], lines
  assert sorted(os.listdir(workdir)) == ["notes.txt"]


def test_a_bucket_workdir_goes_through_the_same_path_layer(monkeypatch):
  """gs:// through etils.epath, with fsspec's in-memory filesystem standing in for GCS (no
  network here; orbax writes its checkpoints through the same epath paths): the workdir check,
  metrics.jsonl appended across two writers (a resumed run), and TensorBoard event files."""
  from etils import epath
  from vlm_jax.train.metrics import MetricWriter

  helpers.fake_gcs(monkeypatch)
  root = "gs://bucket/run"
  loop.check_workdir(helpers.tiny_config(), root)  # nothing there yet: fine, writes nothing
  assert not epath.Path(root).exists()
  event_bytes = []
  for steps in ([1, 2], [3]):
    writer = MetricWriter(root)
    for step in steps:
      writer.write(step, {"train/loss": float(step)})
    writer.close()
    event_bytes.append(sum(len(e.read_bytes()) for e in epath.Path(root, "tensorboard").iterdir()))
  rows = [json.loads(line) for line in epath.Path(root, "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert 0 < event_bytes[0] < event_bytes[1]  # the second writer's events were added, none lost
  epath.Path(root, "checkpoints").write_text("a file")
  with pytest.raises(UserError, match="gs://bucket/run/checkpoints is a file where a directory belongs"):
    loop.check_workdir(helpers.tiny_config(), root)
  # --checkpoint gs://...: the workdir or one of its steps (orbax then reads it through epath)
  epath.Path(root, "checkpoints").unlink()
  epath.Path(root, "checkpoints", "7").mkdir(parents=True)
  epath.Path(root, "checkpoints", "7", "_CHECKPOINT_METADATA").write_text("{}")
  epath.Path(root, "config.json").write_text("{}")
  assert checkpoint_lib.resolve(root) == (root, None)
  assert checkpoint_lib.resolve(f"{root}/checkpoints/7") == (root, 7)
  with pytest.raises(UserError, match="no such file or directory: gs://bucket/nope"):
    checkpoint_lib.resolve("gs://bucket/nope")
