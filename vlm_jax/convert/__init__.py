"""Hugging Face <-> vlm-jax: key tables per model family (tables.py), config maps (hf_config.py),
import (hf_import.py) and export (hf_export.py) of LLaVA-family safetensors checkpoints."""
