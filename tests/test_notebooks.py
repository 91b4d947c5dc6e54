"""The Colab notebooks run top to bottom with small settings, show their pictures, and end by asserting
that their result is real (the notebook's own last cell: a trained model learned, a fine-tuned one
improved, an exported one gives our logits, AnyRes counts equal `vlm-jax tokens`)."""

import os

import nbclient
import nbformat
import pytest

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "colab")) if f.endswith(".ipynb"))


def test_the_notebooks_are_there():
  assert set(NOTEBOOKS) >= {"quickstart.ipynb", "chat.ipynb", "finetune.ipynb", "anyres.ipynb"}, NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_shows_pictures_and_checks_its_result(name, tmp_path, monkeypatch):
  monkeypatch.setenv("VLM_JAX_NOTEBOOK_STEPS", "20")
  monkeypatch.setenv("VLM_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("XLA_FLAGS", processes.xla_flags(1))
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert 'importlib.util.find_spec("vlm_jax")' in code[0].source, f"{name}: the first cell installs on Colab"
  assert "\nassert " in "\n" + code[-1].source, f"{name}: the last cell asserts the result"
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  pictures = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert pictures, f"{name}: no pictures"
