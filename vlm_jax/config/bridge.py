"""config.model.bridge: what turns the vision tower's tokens into the LLM's; its kind is a registry
entry (vlm_jax/models/bridge.py BRIDGES), checked there (build.validate)."""

import ml_collections


def defaults() -> ml_collections.ConfigDict:
  # kinds (vlm_jax/models/bridge.py BRIDGES): linear, mlp2x_gelu (LLaVA-1.5), perceiver,
  # qformer (BLIP-2), cabstractor (Honeybee), pixel_shuffle (Idefics3, nanoVLM)
  return ml_collections.ConfigDict(
    dict(
      kind="mlp2x_gelu",
      depth=2,  # perceiver, qformer: layers; cabstractor: ResBlocks before and after pooling
      heads=4,  # perceiver, qformer
      width=0,  # qformer, cabstractor: hidden width (0 = the LLM's)
      num_latents=16,  # perceiver: tokens per image
      num_queries=16,  # qformer: tokens per image (BLIP-2: 32)
      cross_attention_every=2,  # qformer: layers 0, k, 2k, ... cross-attend to the image (BLIP-2: 2)
      mlp_dim=0,  # qformer: MLP width (0 = 4 x width)
      norm_eps=1e-12,  # qformer: LayerNorm epsilon (BERT's)
      num_tokens=16,  # cabstractor: tokens per image after pooling, a square (Honeybee: 144)
      factor=2,  # pixel_shuffle: r x r patches per token (Idefics3: 3, SmolVLM: 4)
      projection="linear",
    )
  )  # pixel_shuffle: linear (no bias, Idefics3) | mlp (two layers, GELU)
