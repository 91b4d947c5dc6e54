"""The default: a tiny VLM trained from scratch on the built-in `shapes` set, minutes on a CPU.

Tuned on a 2-core CPU (docs/performance.md "What the default config reaches"): 16-px patches, one
per grid cell of the shapes images (16 visual tokens); peak lr 5e-4 (1e-3 and 2e-3 stalled the
binding of a named shape to its patch), twice that for the LLM, whose lookup of the named shape
among the visual tokens is what comes last and what varied most between seeds at one lr; 8 LLM
heads of 16 dims, not 4 of 32 (the same width and FLOPs; the binding is learned in about half the
steps).
"""

from vlm_jax.config import base


def get_config(arg=None):
  config = base()
  config.stage = "full"  # nothing is pretrained here: everything learns
  config.model.vision.patch_size = 16
  config.model.llm.update(heads=8, kv_heads=8, head_dim=16)
  # The reference paths: at 72 tokens the speed levers gain nothing measurable (~0.13 s a step
  # either way), so the config keeps the numerics it was tuned with.
  config.model.attention = "xla"
  config.model.loss_chunk = 0
  config.data.seq_len = 72  # 16 image tokens + 4 question/answer rounds: 67 tokens (every training conversation)
  config.train.steps = 1800  # 5-6 min alone on 2 cores
  config.train.lr = 5e-4
  config.train.lr_mult.llm = 2.0
  config.train.log_every = 50
  config.train.eval_every = 450
  config.train.checkpoint_every = 900
  return config
