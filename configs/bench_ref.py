"""The performance reference workload: LLaVA-1.5 (llava15_ref.py: CLIP
ViT-L/14-336 frozen, mlp2x_gelu) on a 1.1B Llama-shaped LLM (TinyLlama: width 2048, MLP 5632,
22 layers, 32 heads, 4 KV heads, vocab 32000), 8 sequences x 2048 tokens, one image each.

`get_config("stage2")` (the default) trains the bridge and the LLM, `get_config("stage1")` the
bridge only. bench/train_step.py --shape ref runs this workload against transformers; `vlm-jax
compile --config configs/bench_ref.py --topology v5e:2x2` compiles it for a TPU slice.
"""

import llava15_ref  # beside this file


def get_config(arg=None):
  config = llava15_ref.get_config(arg or "stage2")
  config.model.llm.update(
    dict(vocab_size=32000, width=2048, depth=22, heads=32, kv_heads=4, head_dim=64, mlp_dim=5632, max_len=4096)
  )
  config.model.remat = "none"
  config.data.seq_len = 2048
  config.train.batch_size = 8
  return config
