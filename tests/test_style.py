"""The whole tree is formatted and linted as pyproject.toml's [tool.ruff] says: CI keeps it so.
To fix a failure: `ruff format . && ruff check --fix .` from the repository root."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [("format", "--check"), ("check",)], ids=["format", "lint"])
def test_the_tree_passes_ruff(command):
  result = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout}{result.stderr}"
