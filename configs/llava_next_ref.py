"""LLaVA-NeXT recipe: LLaVA-1.5's model (llava15_ref.py: CLIP ViT-L/14-336, mlp2x_gelu, a
Vicuna-7B-sized Llama) with AnyRes tiling over LLaVA-NeXT's pinpoints (up to 2x2 or 1x3 tiles + a
base view: at most 2928 image tokens).

`get_config("stage1")` trains the bridge (and image_newline) only, `get_config("stage2")` the
bridge and the LLM (the default). Start from pretrained weights with --config.model.init_from (a
Hugging Face LLaVA-NeXT or LLaVA directory, or a workdir): the checkpoint brings the model, tokenizer,
chat template and image processor, as in llava15_ref.py. Rows are 4096 tokens (up to 2928 of
them an image's), so the LLM's context is 4096; a checkpoint whose max_position_embeddings is
shorter needs --config.model.llm.max_len=4096. Mesh, micro-batches and remat as llava15_ref.py's.
"""

import llava15_ref  # beside this file


def get_config(arg=None):
  config = llava15_ref.get_config(arg)
  config.model.anyres.update(
    dict(
      enabled=True,
      grid_pinpoints="[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]",
      base_view=True,
      max_n=0,
      max_tiles=0,
    )
  )
  config.data.image_resize = "squash"  # AnyRes tiles the image itself; its base view is squashed
  config.data.seq_len = 4096
  config.model.llm.max_len = 4096
  return config
