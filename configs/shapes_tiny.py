"""The default: a tiny VLM trained from scratch on the built-in `shapes` set, minutes on a CPU.

Tuned on a 2-core CPU (see README): 16-px patches, one per grid cell of the shapes images (16
visual tokens); lr 5e-4 (2e-3 stalled the binding of a named shape to its patch).
"""

from vlm_jax.config import base


def get_config(arg=None):
  config = base()
  config.stage = "full"  # nothing is pretrained here: everything learns
  config.model.vision.patch_size = 16
  # The reference paths: at 80 tokens the speed levers gain nothing measurable (~0.13 s a step
  # either way), and this run's held-out accuracy is on the edge of 90% (its "side" questions), so
  # it keeps the numerics it was tuned with (README "What the default config reaches").
  config.model.attention = "xla"
  config.model.loss_chunk = 0
  config.data.seq_len = 80  # 16 image tokens + 4 question/answer rounds (longest: 71 tokens)
  config.train.steps = 2400  # ~11 min alone on 2 cores; held-out accuracy passes 90% near the end
  config.train.lr = 5e-4
  config.train.log_every = 50
  config.train.eval_every = 800
  config.train.checkpoint_every = 800
  return config
