"""The Colab notebooks run top to bottom (few training steps) and show their pictures."""

import os

import nbclient
import nbformat
import pytest

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "colab")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_shows_pictures(name, tmp_path, monkeypatch):
  monkeypatch.setenv("VLM_JAX_NOTEBOOK_STEPS", "20")
  monkeypatch.setenv("VLM_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("XLA_FLAGS", processes.xla_flags(1))
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  pictures = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
  ]
  assert len(pictures) >= 3, f"{name}: {len(pictures)} pictures"
  assert os.listdir(tmp_path / "work" / "checkpoints")
