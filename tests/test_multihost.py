"""The multi-host path on one machine: two processes (gloo CPU collectives) train like one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py")
# A model that compiles in seconds; fp32 so the two runs can be compared tightly.
TINY = ["--config.model.dtype=float32", "--config.model.vision.image_size=32",
        "--config.model.vision.patch_size=8", "--config.model.vision.width=32",
        "--config.model.vision.depth=1", "--config.model.vision.mlp_dim=64",
        "--config.model.llm.width=32", "--config.model.llm.mlp_dim=64", "--config.model.llm.head_dim=8",
        "--config.train.batch_size=8", "--config.train.steps=4", "--config.train.warmup_steps=0", "--config.train.log_every=1",
        "--config.train.eval_every=4", "--config.train.checkpoint_every=2",
        "--config.train.eval_examples=8", "--config.train.eval_batch_size=8", "--config.mesh.data=-1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(workdir: str, processes: int) -> None:
  """`vlm-jax train` over 8 CPU devices split evenly across `processes` local processes."""
  args = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", CONFIG, "--workdir", workdir, *TINY]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
  procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True) for i in range(processes)]
  errors = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]


def _metrics(workdir: str) -> dict[int, dict]:
  out: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row.pop("step"), {}).update(row)
  return out


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _train(one, 1)
  _train(two, 2)
  a, b = _metrics(one), _metrics(two)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    for key in ("train/loss", "train/grad_norm"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, err_msg=f"{key} at {step}")
  # Eval (greedy decoding over params sharded across both processes) agrees as well.
  evals = [k for k in a[4] if k.startswith("eval/")]
  assert evals and all(np.isclose(a[4][k], b[4][k], rtol=1e-4) for k in evals), (a[4], b[4])
  # Both processes wrote their shards of one checkpoint; only process 0 wrote the logs.
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]
