"""Key tables: which HF tensor is which of our parameters, and how its layout differs.

One table per family. An entry names our param path (relative to its component: vision, bridge,
llm), the HF key (relative to the component's prefix in the file, "{i}" for a per-layer tensor,
which our scanned layers stack on a leading axis), and the layout transform. The four LLM
families (Llama, Mistral, Qwen2, Gemma) share HF's Llama key names; they differ in config
(hf_config.py) and in which optional entries apply (biases, a separate head).
"""

import dataclasses
import math
from typing import Callable

import ml_collections
import numpy as np

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """Our array <-> HF array for one tensor (one layer of a stacked param)."""

  name: str
  hf_shape: Callable[[Shape], Shape]  # our shape -> the HF tensor's shape
  to_ours: Callable[[np.ndarray, Shape], np.ndarray]  # (HF tensor, our shape) -> ours
  to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda s: s, lambda x, s: x, lambda x: x)
# A flat HF vector that we keep split by head ([heads * head_dim] <-> [heads, head_dim]).
FLAT = Transform("flat", lambda s: (math.prod(s),), lambda x, s: x.reshape(s), lambda x: x.reshape(-1))
# PyTorch conv weight [out, in, kh, kw] <-> flax [kh, kw, in, out].
CONV = Transform(
  "conv", lambda s: (s[3], s[2], s[0], s[1]), lambda x, s: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)
)
# An HF tensor with a leading axis of 1 that we do not keep (BLIP-2's query_tokens, SigLIP's probe).
LEADING_ONE = Transform("leading_one", lambda s: (1,) + s, lambda x, s: x.reshape(s), lambda x: x[None])


def linear(n_in: int) -> Transform:
  """nn.Linear weight [out, in] <-> our kernel [*in, *out] (the first n_in axes are inputs).

  Both sides flatten (heads, head_dim) row-major, so HF's view(heads, head_dim) is our split.
  """

  def to_hf(x):
    return x.reshape(math.prod(x.shape[:n_in]), -1).T

  return Transform(
    f"linear{n_in}", lambda s: (math.prod(s[n_in:]), math.prod(s[:n_in])), lambda x, s: x.T.reshape(s), to_hf
  )


LINEAR, LINEAR_2IN = linear(1), linear(2)


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: str  # param path within the component, e.g. "layers/q/kernel"
  hf: str  # HF key within the component's prefix, e.g. "layers.{i}.self_attn.q_proj.weight"
  transform: Transform
  slot: str = ""  # which layout prefix applies; "" = the component's own

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def _block(ours: str, hf: str, transform: Transform = COPY) -> Entry:
  return Entry(ours, hf, transform)


# --- LLMs: Llama, Mistral, Qwen2, Gemma ------------------------------------------------------
LLAMA = (
  _block("embedder/embedding", "embed_tokens.weight"),
  _block("layers/attn_norm/scale", "layers.{i}.input_layernorm.weight"),
  _block("layers/q/kernel", "layers.{i}.self_attn.q_proj.weight", LINEAR),
  _block("layers/k/kernel", "layers.{i}.self_attn.k_proj.weight", LINEAR),
  _block("layers/v/kernel", "layers.{i}.self_attn.v_proj.weight", LINEAR),
  _block("layers/o/kernel", "layers.{i}.self_attn.o_proj.weight", LINEAR_2IN),
  _block("layers/mlp_norm/scale", "layers.{i}.post_attention_layernorm.weight"),
  _block("layers/gate/kernel", "layers.{i}.mlp.gate_proj.weight", LINEAR),
  _block("layers/up/kernel", "layers.{i}.mlp.up_proj.weight", LINEAR),
  _block("layers/down/kernel", "layers.{i}.mlp.down_proj.weight", LINEAR),
  _block("final_norm/scale", "norm.weight"),
)
QKV_BIAS = (  # Qwen2
  _block("layers/q/bias", "layers.{i}.self_attn.q_proj.bias", FLAT),
  _block("layers/k/bias", "layers.{i}.self_attn.k_proj.bias", FLAT),
  _block("layers/v/bias", "layers.{i}.self_attn.v_proj.bias", FLAT),
)
LM_HEAD = (Entry("lm_head", "lm_head.weight", LINEAR, slot="llm_head"),)  # absent when tied


def llm_entries(cfg: ml_collections.ConfigDict) -> tuple[Entry, ...]:
  return LLAMA + (QKV_BIAS if cfg.qkv_bias else ()) + (() if cfg.tie_embeddings else LM_HEAD)


# --- Vision towers: CLIP, SigLIP -------------------------------------------------------------
VIT_BLOCK = (
  _block("layers/attn_norm/scale", "encoder.layers.{i}.layer_norm1.weight"),
  _block("layers/attn_norm/bias", "encoder.layers.{i}.layer_norm1.bias"),
  _block("layers/q/kernel", "encoder.layers.{i}.self_attn.q_proj.weight", LINEAR),
  _block("layers/q/bias", "encoder.layers.{i}.self_attn.q_proj.bias", FLAT),
  _block("layers/k/kernel", "encoder.layers.{i}.self_attn.k_proj.weight", LINEAR),
  _block("layers/k/bias", "encoder.layers.{i}.self_attn.k_proj.bias", FLAT),
  _block("layers/v/kernel", "encoder.layers.{i}.self_attn.v_proj.weight", LINEAR),
  _block("layers/v/bias", "encoder.layers.{i}.self_attn.v_proj.bias", FLAT),
  _block("layers/o/kernel", "encoder.layers.{i}.self_attn.out_proj.weight", LINEAR_2IN),
  _block("layers/o/bias", "encoder.layers.{i}.self_attn.out_proj.bias"),
  _block("layers/mlp_norm/scale", "encoder.layers.{i}.layer_norm2.weight"),
  _block("layers/mlp_norm/bias", "encoder.layers.{i}.layer_norm2.bias"),
  _block("layers/fc1/kernel", "encoder.layers.{i}.mlp.fc1.weight", LINEAR),
  _block("layers/fc1/bias", "encoder.layers.{i}.mlp.fc1.bias"),
  _block("layers/fc2/kernel", "encoder.layers.{i}.mlp.fc2.weight", LINEAR),
  _block("layers/fc2/bias", "encoder.layers.{i}.mlp.fc2.bias"),
)
CLIP = (
  _block("patch_embed/kernel", "embeddings.patch_embedding.weight", CONV),  # no bias in CLIP
  _block("cls", "embeddings.class_embedding"),
  _block("pos_embed", "embeddings.position_embedding.weight"),  # CLS row first
  _block("pre_norm/scale", "pre_layrnorm.weight"),  # sic: HF's spelling
  _block("pre_norm/bias", "pre_layrnorm.bias"),
) + VIT_BLOCK
SIGLIP = (
  _block("patch_embed/kernel", "embeddings.patch_embedding.weight", CONV),
  _block("patch_embed/bias", "embeddings.patch_embedding.bias"),
  _block("pos_embed", "embeddings.position_embedding.weight"),
) + VIT_BLOCK
# Both towers end in post_layernorm; LLaVA reads hidden states before it, so it is ours only
# when config.model.vision.final_norm is set.
POST_NORM = (
  _block("final_norm/scale", "post_layernorm.weight"),
  _block("final_norm/bias", "post_layernorm.bias"),
)
VISION = {"clip": CLIP, "siglip": SIGLIP}


def vision_entries(cfg: ml_collections.ConfigDict) -> tuple[Entry, ...]:
  return VISION[cfg.flavour] + (POST_NORM if cfg.final_norm else ())


# --- LLaVA projector (mlp2x_gelu) -------------------------------------------------------------
LLAVA_PROJECTOR = (
  _block("linear_1/kernel", "linear_1.weight", LINEAR),
  _block("linear_1/bias", "linear_1.bias"),
  _block("linear_2/kernel", "linear_2.weight", LINEAR),
  _block("linear_2/bias", "linear_2.bias"),
)


# --- LLaVA-NeXT's image_newline: a top-level param of ours (no path below the component) ---
IMAGE_NEWLINE = (_block("", "image_newline"),)


# --- Contrastive two-tower models: transformers' CLIPModel and SiglipModel ---------------------
# The text tower: the ViT's block keys under text_model. (HF's CLIP and SigLIP encoders are alike).
TEXT_TOWER = (
  (
    _block("embed/embedding", "embeddings.token_embedding.weight"),
    _block("pos_embed", "embeddings.position_embedding.weight"),
  )
  + VIT_BLOCK
  + (
    _block("final_norm/scale", "final_layer_norm.weight"),
    _block("final_norm/bias", "final_layer_norm.bias"),
  )
)
# SigLIP's vision_model.head. HF stacks q, k and v in one in_proj tensor: KEY[q] names its first
# third, and so on (convert/contrastive.py splits it on import and stacks it again on export).
MAP_HEAD = (
  _block("probe", "probe", LEADING_ONE),
  *(_block(f"{p}/kernel", f"attention.in_proj_weight[{p}]", LINEAR) for p in "qkv"),
  *(_block(f"{p}/bias", f"attention.in_proj_bias[{p}]", FLAT) for p in "qkv"),
  _block("o/kernel", "attention.out_proj.weight", LINEAR_2IN),
  _block("o/bias", "attention.out_proj.bias"),
  _block("norm/scale", "layernorm.weight"),
  _block("norm/bias", "layernorm.bias"),
  _block("fc1/kernel", "mlp.fc1.weight", LINEAR),
  _block("fc1/bias", "mlp.fc1.bias"),
  _block("fc2/kernel", "mlp.fc2.weight", LINEAR),
  _block("fc2/bias", "mlp.fc2.bias"),
)
# Per family: the text head (CLIP's text_projection sits outside text_model.: the "root" slot)
# and the logit scale and bias (CLIP's scale is a scalar, SigLIP's are [1]).
CONTRASTIVE = {
  "clip": dict(
    text=TEXT_TOWER + (Entry("head/kernel", "text_projection.weight", LINEAR, slot="root"),),
    image_projection=(_block("kernel", "visual_projection.weight", LINEAR),),
    logit_scale=(_block("", "logit_scale"),),
  ),
  "siglip": dict(
    text=TEXT_TOWER + (_block("head/kernel", "head.weight", LINEAR), _block("head/bias", "head.bias")),
    image_head=MAP_HEAD,
    logit_scale=(_block("", "logit_scale", FLAT),),
    logit_bias=(_block("", "logit_bias", FLAT),),
  ),
}


def entries(model_cfg: ml_collections.ConfigDict, components: tuple[str, ...]) -> dict[str, tuple[Entry, ...]]:
  """{component: its entries} for the given components of a model config."""
  table = {
    "vision": lambda: vision_entries(model_cfg.vision),
    "bridge": lambda: LLAVA_PROJECTOR,
    "llm": lambda: llm_entries(model_cfg.llm),
    "image_newline": lambda: IMAGE_NEWLINE,
  }
  if "contrastive" in model_cfg:
    table.update({c: lambda es=es: es for c, es in CONTRASTIVE[model_cfg.contrastive.family].items()})
  return {c: table[c]() for c in components}
