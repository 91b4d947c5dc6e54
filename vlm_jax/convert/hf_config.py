"""HF config.json <-> our config.model, one table per family; unsupported settings are errors.

HF configs may omit fields that take their class defaults, so each family lists the defaults
of the fields read here (transformers' config classes, without importing transformers).
"""

import dataclasses
import json
from typing import Callable

import ml_collections

from vlm_jax.errors import UserError

ACT_FROM_HF = {
  "silu": "silu",
  "swish": "silu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "quick_gelu": "quick_gelu",
  "gelu": "gelu",
}
ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}


# --- LLMs: one registry entry per HF family ----------------------------------------------------
def _no_check(tc: dict, get: Callable, where: str) -> None:
  del tc, get, where


def _qwen2_check(tc: dict, get: Callable, where: str) -> None:
  sliding = [t for t in (tc.get("layer_types") or []) if t != "full_attention"]
  if sliding or (tc.get("use_sliding_window") and tc.get("max_window_layers", 28) < get("num_hidden_layers")):
    raise UserError(f"{where}.use_sliding_window: Qwen2's per-layer sliding window is not supported")


@dataclasses.dataclass(frozen=True)
class LLMFamily:
  """A HF decoder family: our block variant for it and what its config holds beyond Llama's.

  Adding a family that shares HF's Llama key names is one LLM_FAMILIES entry (tables.py keys
  the optional tensors, e.g. QKV biases, off the block variant)."""

  model_type: str
  architecture: str
  defaults: dict  # HF class defaults of the fields read below
  fixed: dict  # our llm fields the family's code implies (the block variant)
  sliding_window: bool = False  # reads and writes HF's sliding_window (Mistral)
  act_aliases: dict = dataclasses.field(default_factory=dict)  # legacy hidden_act values it means otherwise
  check: Callable[[dict, Callable, str], None] = _no_check  # raises on settings we cannot run
  hf_fixed: dict = dataclasses.field(default_factory=dict)  # written as is into its HF config
  derived: tuple[str, ...] = ()  # HF keys derived again from the others on load (dropped on export)


_LLAMA = dict(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=None,
  head_dim=None,
  hidden_act="silu",
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
  max_position_embeddings=2048,
  rope_theta=10000.0,
  sliding_window=None,
)
_PLAIN = dict(qkv_bias=False, norm_offset=0.0, embed_scale=False)
LLM_FAMILIES = {  # the first whose block variant fits a config trained here is the one it exports as
  "llama": LLMFamily("llama", "LlamaForCausalLM", _LLAMA, _PLAIN),
  "mistral": LLMFamily(
    "mistral",
    "MistralForCausalLM",
    {
      **_LLAMA,
      "intermediate_size": 14336,
      "num_key_value_heads": 8,
      "max_position_embeddings": 131072,
      "sliding_window": 4096,
    },
    _PLAIN,
    sliding_window=True,
  ),
  "qwen2": LLMFamily(
    "qwen2",
    "Qwen2ForCausalLM",
    {
      **_LLAMA,
      "vocab_size": 151936,
      "intermediate_size": 22016,
      "num_key_value_heads": 32,
      "max_position_embeddings": 32768,
    },
    {**_PLAIN, "qkv_bias": True},
    check=_qwen2_check,
    hf_fixed=dict(use_sliding_window=False, sliding_window=None),
    derived=("layer_types",),
  ),
  "gemma": LLMFamily(
    "gemma",
    "GemmaForCausalLM",
    {
      **_LLAMA,
      "vocab_size": 256000,
      "hidden_size": 3072,
      "intermediate_size": 24576,
      "num_hidden_layers": 28,
      "num_attention_heads": 16,
      "num_key_value_heads": 16,
      "head_dim": 256,
      "hidden_act": "gelu_pytorch_tanh",
      "tie_word_embeddings": True,
      "max_position_embeddings": 8192,
    },
    dict(qkv_bias=False, norm_offset=1.0, embed_scale=True),
    # a legacy value of Gemma releases that means the tanh GELU (as transformers)
    act_aliases={"gelu": "gelu_pytorch_tanh"},
  ),
}


def getter(cfg: dict, defaults: dict):
  """key -> cfg's value, or the class default where cfg omits it (or has null)."""
  return lambda key: cfg[key] if cfg.get(key) is not None else defaults.get(key)


def _rope_from_hf(tc: dict, get, where: str) -> dict:
  rp = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
  if rp and not isinstance(rp.get("rope_type", rp.get("type", "")), str):
    raise UserError(f"{where}.rope_parameters: per-layer-type RoPE is not supported")
  kind = rp.get("rope_type", rp.get("type", "default"))
  partial = rp.get("partial_rotary_factor", tc.get("partial_rotary_factor"))
  if partial not in (None, 1.0):
    raise UserError(f"{where}: partial_rotary_factor {partial} is not supported")
  out = dict(rope_theta=float(rp.get("rope_theta", get("rope_theta"))), rope_type=kind)
  if kind == "linear":
    out.update(rope_factor=float(rp["factor"]))
  elif kind == "llama3":
    out.update(
      rope_factor=float(rp["factor"]),
      rope_low_freq_factor=float(rp["low_freq_factor"]),
      rope_high_freq_factor=float(rp["high_freq_factor"]),
      rope_original_max_len=int(rp.get("original_max_position_embeddings", get("max_position_embeddings"))),
    )
  elif kind != "default":
    raise UserError(f"{where}.rope_parameters.rope_type: {kind!r} is not supported (default, linear, llama3)")
  return out


def llm_from_hf(tc: dict, where: str) -> tuple[dict, str]:
  """HF text config -> (our config.model.llm fields, family name)."""
  family = LLM_FAMILIES.get(tc.get("model_type"))
  if family is None:
    raise UserError(f"{where}.model_type: {tc.get('model_type')!r} is not a supported LLM ({', '.join(LLM_FAMILIES)})")
  get = getter(tc, family.defaults)
  for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
    if tc.get(flag):
      raise UserError(f"{where}.{flag}: true is not supported for {family.model_type}")
  family.check(tc, get, where)
  act = family.act_aliases.get(get("hidden_act"), get("hidden_act"))
  if act not in ACT_FROM_HF:
    raise UserError(f"{where}.hidden_act: {act!r} is not supported ({', '.join(ACT_FROM_HF)})")
  window = get("sliding_window") if family.sliding_window else None
  heads, width = get("num_attention_heads"), get("hidden_size")
  out = dict(
    vocab_size=get("vocab_size"),
    width=width,
    depth=get("num_hidden_layers"),
    heads=heads,
    kv_heads=get("num_key_value_heads") or heads,
    head_dim=get("head_dim") or width // heads,
    mlp_dim=get("intermediate_size"),
    norm_eps=float(get("rms_norm_eps")),
    tie_embeddings=bool(get("tie_word_embeddings")),
    mlp_act=ACT_FROM_HF[act],
    sliding_window=int(window or 0),
    max_len=int(get("max_position_embeddings")),
    **_rope_from_hf(tc, get, where),
    **family.fixed,
  )
  return out, family.model_type


def infer_llm_family(llm: ml_collections.ConfigDict) -> str:
  """The family a model trained here exports as: the first whose block variant it has (one that
  reads a sliding window, if it uses one)."""
  fits = [f for f in LLM_FAMILIES.values() if all(llm[k] == v for k, v in f.fixed.items())]
  if not fits:
    raise UserError(
      f"config.model.llm: no Hugging Face family has its block variant "
      f"({', '.join(f'{k}={llm[k]!r}' for k in _PLAIN)}); known: {', '.join(LLM_FAMILIES)}"
    )
  return next((f for f in fits if f.sliding_window or not llm.sliding_window), fits[0]).model_type


def llm_to_hf(llm: ml_collections.ConfigDict, family_name: str, base: dict | None = None) -> dict:
  """Our config.model.llm -> HF text config (on top of `base`, the config it was read from)."""
  family = LLM_FAMILIES[family_name]
  for key, value in family.fixed.items():
    if llm[key] != value:
      raise UserError(
        f"config.model.llm.{key}={llm[key]!r} cannot be written as a HF {family_name} model (which has {key}={value!r})"
      )
  if llm.sliding_window and not family.sliding_window:
    raise UserError(
      f"config.model.llm.sliding_window={llm.sliding_window} cannot be written as a HF {family_name} model"
    )
  rope = dict(rope_type=llm.rope_type, rope_theta=llm.rope_theta)
  if llm.rope_type in ("linear", "llama3"):
    rope["factor"] = llm.rope_factor
  if llm.rope_type == "llama3":
    rope.update(
      low_freq_factor=llm.rope_low_freq_factor,
      high_freq_factor=llm.rope_high_freq_factor,
      original_max_position_embeddings=llm.rope_original_max_len,
    )
  dropped = ("rope_scaling", "rope_theta", "hidden_activation") + family.derived
  out = {k: v for k, v in (base or {}).items() if k not in dropped}
  out.update(
    model_type=family_name,
    vocab_size=llm.vocab_size,
    hidden_size=llm.width,
    intermediate_size=llm.mlp_dim,
    num_hidden_layers=llm.depth,
    num_attention_heads=llm.heads,
    num_key_value_heads=llm.kv_heads,
    head_dim=llm.head_dim,
    hidden_act=ACT_TO_HF[llm.mlp_act],
    rms_norm_eps=llm.norm_eps,
    tie_word_embeddings=llm.tie_embeddings,
    rope_parameters=rope,
    max_position_embeddings=llm.max_len,
  )
  if family.sliding_window:
    out["sliding_window"] = llm.sliding_window or None
  out.update(family.hf_fixed)
  return out


# --- Vision towers ---------------------------------------------------------------------------
_VIT = dict(
  hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, num_channels=3
)
VISION_FAMILIES = {
  "clip_vision_model": ("clip", {**_VIT, "patch_size": 32, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}),
  "siglip_vision_model": (
    "siglip",
    {**_VIT, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"},
  ),
}
FLAVOUR_MODEL_TYPE = {flavour: mt for mt, (flavour, _) in VISION_FAMILIES.items()}
FLAVOUR_ACT = {"clip": "quick_gelu", "siglip": "gelu_tanh"}


def vision_from_hf(vc: dict, feature_layer, strategy: str, where: str) -> tuple[dict, int]:
  """HF vision config + LLaVA's feature layer and select strategy -> (our vision fields, the
  tower's total number of layers). We run only the blocks LLaVA reads: hidden_states[k] is the
  output of block k (0 = embeddings), so feature_layer -2 of N blocks is depth N - 1."""
  model_type = vc.get("model_type")
  if model_type not in VISION_FAMILIES:
    raise UserError(
      f"{where}.model_type: {model_type!r} is not a supported vision tower ({', '.join(VISION_FAMILIES)})"
    )
  flavour, defaults = VISION_FAMILIES[model_type]
  get = getter(vc, defaults)
  if not isinstance(feature_layer, int):
    raise UserError(f"vision_feature_layer: {feature_layer!r}: only one feature layer is supported")
  n = get("num_hidden_layers")
  depth = n + 1 + feature_layer if feature_layer < 0 else feature_layer
  if not 1 <= depth <= n:
    raise UserError(f"vision_feature_layer: {feature_layer} selects no block of a {n}-layer tower")
  if strategy not in ("default", "full"):
    raise UserError(f"vision_feature_select_strategy: {strategy!r} is not default or full")
  if flavour == "siglip" and strategy == "default":
    raise UserError(
      "vision_feature_select_strategy: 'default' drops the first patch of a SigLIP tower "
      "(which has no CLS token); only 'full' is supported"
    )
  act = get("hidden_act")
  if act not in ACT_FROM_HF:
    raise UserError(f"{where}.hidden_act: {act!r} is not supported ({', '.join(ACT_FROM_HF)})")
  if get("num_channels") != 3:
    raise UserError(f"{where}.num_channels: {get('num_channels')} is not supported (3)")
  for key in ("image_size", "patch_size"):
    if not isinstance(get(key), int):
      raise UserError(f"{where}.{key}: {get(key)!r} is not supported (one int: a square)")
  out = dict(
    flavour=flavour,
    image_size=get("image_size"),
    patch_size=get("patch_size"),
    width=get("hidden_size"),
    depth=depth,
    heads=get("num_attention_heads"),
    mlp_dim=get("intermediate_size"),
    norm_eps=float(get("layer_norm_eps")),
    keep_cls=flavour == "clip" and strategy == "full",
    final_norm=False,
    act="" if ACT_FROM_HF[act] == FLAVOUR_ACT[flavour] else ACT_FROM_HF[act],
  )
  return out, n


def vision_tower_to_hf(
  v: ml_collections.ConfigDict, total_layers: int, base: dict | None = None, has_head: bool = False
) -> dict:
  """Our config.model.vision -> HF vision config (on top of `base`) of a tower with total_layers blocks."""
  out = dict(base or {})
  out.update(
    model_type=FLAVOUR_MODEL_TYPE[v.flavour],
    hidden_size=v.width,
    intermediate_size=v.mlp_dim,
    num_hidden_layers=total_layers,
    num_attention_heads=v.heads,
    image_size=v.image_size,
    patch_size=v.patch_size,
    num_channels=3,
    layer_norm_eps=v.norm_eps,
    hidden_act=ACT_TO_HF[v.act or FLAVOUR_ACT[v.flavour]],
  )
  if v.flavour == "siglip":
    out["vision_use_head"] = has_head
  return out


def vision_to_hf(
  v: ml_collections.ConfigDict, total_layers: int, base: dict | None = None, has_head: bool = False
) -> tuple[dict, int, str]:
  """-> (HF vision config, vision_feature_layer, vision_feature_select_strategy)."""
  if v.final_norm:
    raise UserError(
      "config.model.vision.final_norm: HF Llava reads vision hidden states before "
      "post_layernorm, so a tower that uses it cannot be written as a Llava model"
    )
  strategy = "full" if v.flavour == "siglip" or v.keep_cls else "default"
  return vision_tower_to_hf(v, total_layers, base, has_head), v.depth - total_layers - 1, strategy


# --- LLaVA -----------------------------------------------------------------------------------
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "LlavaNextForConditionalGeneration"
# transformers' LlavaNextConfig default.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_from_hf(hc: dict, where: str) -> dict:
  """Llava(Next)ForConditionalGeneration config.json -> {"vision", "llm", "anyres": our fields,
  "llm_family", "vision_layers", "image_token_id"}."""
  archs = hc.get("architectures") or []
  next_ = hc.get("model_type") == "llava_next" or NEXT_ARCHITECTURE in archs
  if not next_ and hc.get("model_type") != "llava" and LLAVA_ARCHITECTURE not in archs:
    kind = archs[0] if archs else hc.get("model_type")
    raise UserError(
      f"{where}: architecture {kind!r} is not supported ({LLAVA_ARCHITECTURE}, {NEXT_ARCHITECTURE}; "
      "`convert --from-hf` also takes CLIPModel and SiglipModel; an LLM or vision-tower directory "
      "is assembled with `convert --from-hf LLM_DIR --vision VISION_DIR`)"
    )
  if hc.get("projector_hidden_act", "gelu") != "gelu":
    raise UserError(f"{where}.projector_hidden_act: {hc['projector_hidden_act']!r} is not supported (gelu)")
  if not hc.get("multimodal_projector_bias", True):
    raise UserError(f"{where}.multimodal_projector_bias: false is not supported")
  vision, n_layers = vision_from_hf(
    hc.get("vision_config") or {"model_type": "clip_vision_model"},
    hc.get("vision_feature_layer", -2),
    hc.get("vision_feature_select_strategy", "default"),
    f"{where}.vision_config",
  )
  llm, family = llm_from_hf(hc.get("text_config") or {"model_type": "llama"}, f"{where}.text_config")
  image_token_id = hc.get("image_token_id", hc.get("image_token_index", 32000))
  anyres = dict(enabled=False)
  if next_:  # pinpoints are (H, W) pixels in transformers, as in our config
    anyres = dict(
      enabled=True, grid_pinpoints=json.dumps(hc.get("image_grid_pinpoints") or NEXT_PINPOINTS), base_view=True, max_n=0
    )
  return dict(
    vision=vision, llm=llm, anyres=anyres, llm_family=family, vision_layers=n_layers, image_token_id=int(image_token_id)
  )


def llava_to_hf(
  model: ml_collections.ConfigDict,
  *,
  image_token_id: int,
  llm_family: str,
  vision_layers: int,
  has_vision_head: bool,
  base: dict | None = None,
) -> dict:
  """Our config.model -> a Llava(Next)ForConditionalGeneration config.json dict."""
  if model.anyres.enabled and (model.anyres.max_n or not model.anyres.base_view):
    raise UserError("config.model.anyres: max_n and base_view=False cannot be written as a HF LlavaNext model")
  if model.bridge.kind != "mlp2x_gelu":
    raise UserError(
      f"config.model.bridge.kind: {model.bridge.kind!r} cannot be written as a HF Llava projector (mlp2x_gelu)"
    )
  if model.fusion != "tokens":
    raise UserError(
      f"config.model.fusion: {model.fusion!r} has no HF Llava counterpart (the visual tokens go "
      "into the sequence there)"
    )
  if model.vision.token_merging:
    raise UserError(
      "config.model.vision.token_merging: HF Llava has no token merging (its processor would "
      "write the unmerged count of <image> tokens)"
    )
  base = dict(base or {})
  vision, layer, strategy = vision_to_hf(model.vision, vision_layers, base.get("vision_config"), has_vision_head)
  text = llm_to_hf(model.llm, llm_family, base.get("text_config"))
  base.pop("image_token_index", None)
  if model.anyres.enabled:
    from vlm_jax.data import anyres  # numpy + PIL only

    base.update(
      architectures=[NEXT_ARCHITECTURE],
      model_type="llava_next",
      image_grid_pinpoints=[
        list(p) for p in anyres.parse_pinpoints(model.anyres.grid_pinpoints, model.vision.image_size)
      ],
    )
  else:
    base.update(architectures=[LLAVA_ARCHITECTURE], model_type="llava")
    base.pop("image_grid_pinpoints", None)
  base.update(
    vision_config=vision,
    text_config=text,
    image_token_id=image_token_id,
    projector_hidden_act="gelu",
    multimodal_projector_bias=True,
    vision_feature_layer=layer,
    vision_feature_select_strategy=strategy,
    tie_word_embeddings=model.llm.tie_embeddings,
    image_seq_length=(model.vision.image_size // model.vision.patch_size) ** 2 + (1 if model.vision.keep_cls else 0),
  )
  return base
