"""vlm-jax: a JAX/Flax trainer for LLaVA-family vision-language models.

Layers, from the bottom up; a module imports only from layers below its own (tests/test_layers.py
checks it):

  errors, files, config           one-line user errors, JSON files, config defaults and fields
  models | data                   Flax modules | host-side data (numpy and PIL, no jax)
  parallel                        meshes and the logical-axis rules
  tasks, build                    what a batch and its loss are; a run's model, shardings, eval step
  train | infer, then eval        the loop (handed its evaluator) | decoding | scoring
  convert                         Hugging Face in and out
  api, then cli                   vlm_jax.load / api.train, and the `vlm-jax` command

Plug-in points are registries: tasks.TASKS, models.bridge.BRIDGES, models.vit.FLAVOURS,
convert.hf_config.LLM_FAMILIES, data.templates.TEMPLATES.
"""


def load(path: str, dtype: str | None = None):
  """Loads a trained model or a Hugging Face LLaVA directory; see vlm_jax.api.load."""
  from vlm_jax.api import load as _load  # jax is imported only when a model is loaded

  return _load(path, dtype=dtype)
