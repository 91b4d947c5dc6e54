"""config.model.llm: the language model."""

import ml_collections

from vlm_jax.config.checks import check_one_of
from vlm_jax.errors import UserError

ROPE_TYPES = ("default", "linear", "llama3")


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      vocab_size=0,  # 0: the tokenizer's vocabulary size
      width=128,
      depth=2,
      heads=4,
      kv_heads=2,
      head_dim=32,
      mlp_dim=512,
      rope_theta=10000.0,
      norm_eps=1e-6,
      tie_embeddings=False,
      qkv_bias=False,
      mlp_act="silu",  # silu (Llama, Qwen2, Mistral) | gelu_tanh (Gemma)
      norm_offset=0.0,  # RMSNorm scales by (norm_offset + scale): Gemma stores scale - 1
      embed_scale=False,  # token embeddings times sqrt(width) (Gemma; visual tokens are not scaled)
      sliding_window=0,  # 0: full causal attention; W: each query sees its last W keys (Mistral)
      # RoPE frequency scaling: default | linear | llama3 (Llama 3.1+); HF's rope_parameters.
      rope_type="default",
      rope_factor=1.0,
      rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0,
      rope_original_max_len=8192,
      max_len=2048,
    )
  )  # context: prompt + answer tokens generation accepts (HF max_position_embeddings)


def check(llm: ml_collections.ConfigDict) -> None:
  """RoPE scaling and the attention heads; mlp_act names a registry entry (build.validate)."""
  check_one_of("config.model.llm.rope_type", llm.rope_type, ROPE_TYPES)
  if llm.heads % llm.kv_heads:
    raise UserError("config.model.llm.heads must be a multiple of kv_heads")
