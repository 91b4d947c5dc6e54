"""LLaVA-NeXT recipe: CLIP ViT-L/14-336, mlp2x_gelu, a Vicuna-7B-sized Llama, AnyRes tiling over
LLaVA-NeXT's pinpoints (up to 2x2 or 1x3 tiles + a base view: at most 2928 image tokens).

`get_config("stage1")` trains the bridge (and image_newline) only, `get_config("stage2")` the
bridge and the LLM (the default). Start from pretrained weights with --config.model.init_from
(e.g. a directory made by `vlm-jax convert --from-hf LLM_DIR --vision CLIP_DIR`) and point
--config.data.tokenizer at the LLM's tokenizer.
"""

from vlm_jax.config import base

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg=None):
  stage = arg or "stage2"
  config = base()
  config.stage = stage
  m = config.model
  # hidden_states[-2] of the 24-block tower: we run 23 blocks.
  m.vision.update(dict(flavour="clip", image_size=336, patch_size=14, width=1024, depth=23, heads=16,
                       mlp_dim=4096, norm_eps=1e-5, keep_cls=False, final_norm=False))
  m.bridge.kind = "mlp2x_gelu"
  m.llm.update(dict(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=32, head_dim=128,
                    mlp_dim=11008, norm_eps=1e-5))
  m.anyres.update(dict(enabled=True, grid_pinpoints="[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]",
                       base_view=True, max_n=0, max_tiles=0))
  m.remat = "full"
  config.data.image_mean, config.data.image_std = CLIP_MEAN, CLIP_STD
  config.data.seq_len = 4096
  config.train.batch_size = 128 if stage == "stage2" else 256
  config.train.lr = 2e-5 if stage == "stage2" else 1e-3
  config.train.warmup_steps = 30
  config.train.weight_decay = 0.0
  return config
