"""vlm-jax: a JAX/Flax trainer for LLaVA-family vision-language models."""


def load(path: str, dtype: str | None = None):
  """Loads a trained model or a Hugging Face LLaVA directory; see vlm_jax.api.load."""
  from vlm_jax.api import load as _load  # jax is imported only when a model is loaded
  return _load(path, dtype=dtype)
