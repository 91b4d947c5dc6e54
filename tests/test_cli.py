"""Bad input at the CLI: one clear line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py")


def run_cli(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vlm_jax.cli", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("vlm-jax: error:")]
  assert len(lines) == 1, result.stderr
  assert "Traceback" not in result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (("--config.train.lrr=1",), ("train.lrr", "unknown config field")),
    (("--config.train.steps=abc",), ("train.steps",)),
    (("--config.stage=stage9",), ("config.stage",)),
    (("--config.mesh.data=16",), ("config.mesh", "16", "1 are available")),
    (("--config.mesh.data=3", "--config.mesh.fsdp=-1"), ("config.mesh", "do not divide")),
])
def test_train_config_errors(tmp_path, args, needles):
  workdir = tmp_path / "w"
  assert_one_line_error(run_cli("train", "--config", CONFIG, "--workdir", str(workdir), *args), *needles)
  assert not (workdir / "checkpoints").exists()


def test_train_missing_workdir_flag():
  assert_one_line_error(run_cli("train", "--config", CONFIG), "--workdir")


def test_train_missing_config_file(tmp_path):
  assert_one_line_error(run_cli("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)),
                        "nope.py")


def test_impossible_mesh_on_8_devices(tmp_path):
  result = run_cli("train", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
                   "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=3", devices=8)
  assert_one_line_error(result, "2x2x3", "8 are available")


def test_generate_missing_checkpoint(tmp_path):
  image = tmp_path / "a.png"
  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  assert_one_line_error(run_cli("generate", "--checkpoint", str(tmp_path / "missing"), "--image", str(image),
                                "--prompt", "hi"), "--checkpoint", "missing")


def test_generate_missing_image(tmp_path):
  assert_one_line_error(run_cli("generate", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "x.png"),
                                "--prompt", "hi"), "x.png")


def test_generate_not_a_workdir(tmp_path):
  image = tmp_path / "a.png"
  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  assert_one_line_error(run_cli("generate", "--checkpoint", str(tmp_path), "--image", str(image),
                                "--prompt", "hi"), "neither a vlm-jax workdir")


def test_unknown_command_and_flag(tmp_path):
  assert_one_line_error(run_cli("trian"), "unknown command")
  assert_one_line_error(run_cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--bogus"), "--bogus")
