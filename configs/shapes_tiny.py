"""The default: a tiny VLM trained from scratch on the built-in `shapes` set, minutes on a CPU."""

from vlm_jax.config import base


def get_config(arg=None):
  config = base()
  config.stage = "full"       # nothing is pretrained here: everything learns
  return config
