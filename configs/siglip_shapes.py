"""Contrastive pretraining of the vision encoder on `shapes` captions: SigLIP (default) or CLIP
(`--config configs/siglip_shapes.py:clip`), minutes on a 2-core CPU.

Each image's caption names its shapes left to right ("two shapes: a red circle and a blue
square"); the periodic eval is zero-shot classification of colour, shape and count against
prompted class names (eval/zeroshot/<kind>/accuracy). The ViT is the default VLM config's
(configs/shapes_tiny.py), so a VLM run takes it as it is:
`--config.model.vision.init_from=WORKDIR` (docs/contrastive.md).
"""

import shapes_tiny  # beside this file

from vlm_jax.config import eval_entry


def get_config(arg=None):
  family = arg or "siglip"
  config = shapes_tiny.get_config()
  config.task = "contrastive"
  config.model.contrastive.family = family
  config.model.vision.final_norm = True  # both families norm the tokens before pooling
  if family == "clip":
    config.model.vision.update(flavour="clip", keep_cls=True)
  config.model.text.update(width=128, depth=2, heads=4, mlp_dim=512, max_len=32)
  config.data.seq_len = 24  # the longest caption is 17 tokens with BOS and EOS
  config.train.steps = 1200
  config.train.batch_size = 64  # in-batch negatives: more of them than a VLM batch needs
  config.train.lr = 1e-3
  config.train.weight_decay = 1e-4
  config.train.eval_every = 300
  config.train.checkpoint_every = 600
  config.evals = {"zeroshot": eval_entry("shapes:test", metric="zeroshot", max_examples=512)}
  return config
