"""BLIP-2's Q-Former (a Blip2ForConditionalGeneration directory: query_tokens, qformer,
language_projection) as our qformer bridge, for `vlm-jax convert --vision ... --qformer DIR`.

Only the query branch is read: the text branch (intermediate/output, use_qformer_text_input)
never sees the queries, and BLIP-2's vision model and LLM are not ours to take.
"""

import logging
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.build import flat_params
from vlm_jax.convert.safetensors_io import Reader
from vlm_jax.convert.tables import COPY, FLAT, LEADING_ONE, LINEAR, LINEAR_2IN, Transform
from vlm_jax.errors import UserError
from vlm_jax.files import read_json
from vlm_jax.models.bridge import make_bridge

log = logging.getLogger("vlm_jax")

# Blip2QFormerConfig's class defaults of the fields read here (config.json may omit them).
DEFAULTS = dict(
  hidden_size=768,
  num_attention_heads=12,
  num_hidden_layers=12,
  intermediate_size=3072,
  cross_attention_frequency=2,
  encoder_hidden_size=1408,
  layer_norm_eps=1e-12,
  hidden_act="gelu",
)
NUM_QUERY_TOKENS = 32  # Blip2Config's default


def _get(qc: dict, key: str):
  return qc[key] if qc.get(key) is not None else DEFAULTS[key]


def _qformer_config(directory: str) -> tuple[dict, dict, str]:
  hc = read_json(directory)
  where = f"{directory}/config.json"
  if not isinstance(hc.get("qformer_config"), dict):
    raise UserError(f"{where}.qformer_config: missing (--qformer takes a Blip2ForConditionalGeneration directory)")
  return hc, hc["qformer_config"], where


def bridge_config(directory: str) -> dict:
  """config.model.bridge fields (kind qformer) of a BLIP-2 directory's Q-Former."""
  hc, qc, where = _qformer_config(directory)
  get = lambda key: _get(qc, key)
  if get("hidden_act") != "gelu":  # our QFormerLayer's MLP is the exact (erf) GELU
    raise UserError(f"{where}.qformer_config.hidden_act: {get('hidden_act')!r} is not supported (gelu)")
  return dict(
    kind="qformer",
    num_queries=int(hc.get("num_query_tokens") or NUM_QUERY_TOKENS),
    depth=int(get("num_hidden_layers")),
    heads=int(get("num_attention_heads")),
    width=int(get("hidden_size")),
    mlp_dim=int(get("intermediate_size")),
    cross_attention_every=int(get("cross_attention_frequency")),
    norm_eps=float(get("layer_norm_eps")),
  )


def key_table(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, tuple[str, Transform]]:
  """{our path ("bridge/..."): (HF key, transform)} of a qformer bridge config."""
  table = {
    "query_tokens": (prefix + "query_tokens", LEADING_ONE),  # [1, Q, W] <-> ours [Q, W]
    "query_norm/scale": (prefix + "qformer.layernorm.weight", COPY),
    "query_norm/bias": (prefix + "qformer.layernorm.bias", COPY),
    "out_proj/kernel": (prefix + "language_projection.weight", LINEAR),
    "out_proj/bias": (prefix + "language_projection.bias", COPY),
  }
  for i in range(cfg.depth):
    layer = f"{prefix}qformer.encoder.layer.{i}."
    blocks = [("self", layer + "attention.")]
    if i % cfg.cross_attention_every == 0:
      blocks.append(("cross", layer + "crossattention."))
    for ours, hf in blocks:
      for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
        table[f"layer_{i}/{ours}_{p}/kernel"] = (f"{hf}attention.{name}.weight", LINEAR)
        table[f"layer_{i}/{ours}_{p}/bias"] = (f"{hf}attention.{name}.bias", FLAT)
      table[f"layer_{i}/{ours}_o/kernel"] = (hf + "output.dense.weight", LINEAR_2IN)
      table[f"layer_{i}/{ours}_o/bias"] = (hf + "output.dense.bias", COPY)
      table[f"layer_{i}/{ours}_norm/scale"] = (hf + "output.LayerNorm.weight", COPY)
      table[f"layer_{i}/{ours}_norm/bias"] = (hf + "output.LayerNorm.bias", COPY)
    for ours, hf in (("fc1", "intermediate_query.dense"), ("fc2", "output_query.dense")):
      table[f"layer_{i}/{ours}/kernel"] = (f"{layer}{hf}.weight", LINEAR)
      table[f"layer_{i}/{ours}/bias"] = (f"{layer}{hf}.bias", COPY)
    table[f"layer_{i}/mlp_norm/scale"] = (layer + "output_query.LayerNorm.weight", COPY)
    table[f"layer_{i}/mlp_norm/bias"] = (layer + "output_query.LayerNorm.bias", COPY)
  return {f"bridge/{k}": v for k, v in table.items()}


def _shapes(cfg: ml_collections.ConfigDict, vision_width: int, out_width: int) -> dict[str, tuple[int, ...]]:
  bridge = make_bridge(cfg, out_width, jnp.float32)
  init = lambda: nn.meta.unbox(bridge.init(jax.random.key(0), jnp.zeros((1, 1, vision_width))))["params"]
  return {f"bridge/{k}": x.shape for k, x in flat_params(jax.eval_shape(init)).items()}


def from_hf(
  tensors: Mapping[str, np.ndarray],
  cfg: ml_collections.ConfigDict,
  vision_width: int,
  out_width: int,
  prefix: str = "",
  where: str = "BLIP-2",
) -> dict[str, np.ndarray]:
  """HF tensors (a state dict, numpy) -> our qformer bridge's flat fp32 params, projecting to
  out_width; a missing tensor or a shape the config does not imply is a UserError."""
  table = key_table(cfg, prefix)
  out = {}
  for path, shape in _shapes(cfg, vision_width, out_width).items():
    key, transform = table[path]  # a KeyError here is a table bug
    if key not in tensors:
      raise UserError(f"{where}: missing tensor {key} (for our {path})")
    x = np.asarray(tensors[key], np.float32)
    if x.shape != transform.hf_shape(shape):
      raise UserError(
        f"{where}: tensor {key} has shape {list(x.shape)}, but config.json implies {list(transform.hf_shape(shape))}"
      )
    out[path] = transform.to_ours(x, shape)
  return out


def read_bridge(
  directory: str, bridge_cfg: ml_collections.ConfigDict, vision_width: int, llm_width: int
) -> dict[str, np.ndarray]:
  """A BLIP-2 directory's Q-Former as flat fp32 params {"bridge/...": array}. The projection
  is left out (for the caller to initialise) when BLIP-2's LLM is not this model's width."""
  hc, qc, where = _qformer_config(directory)
  encoder = int(_get(qc, "encoder_hidden_size"))
  if encoder != vision_width:
    raise UserError(
      f"{where}.qformer_config.encoder_hidden_size: {encoder}, but the vision tower's width is "
      f"{vision_width} (the Q-Former cross-attends to the tower's features)"
    )
  with Reader(directory) as reader:
    tokens = [k for k in reader.keys() if k.endswith("query_tokens")]
    prefix = tokens[0][: -len("query_tokens")] if tokens else ""  # e.g. "model." in another layout
    projection = prefix + "language_projection.weight"
    out_width = reader.shape(projection)[0] if projection in reader else llm_width
    keys = {k for k, _ in key_table(bridge_cfg, prefix).values() if k in reader}
    params = from_hf({k: reader.get(k) for k in keys}, bridge_cfg, vision_width, out_width, prefix, directory)
  if out_width != llm_width:
    log.info(
      "%s: language_projection maps to width %d, the LLM's is %d: the bridge's out_proj starts fresh",
      directory,
      out_width,
      llm_width,
    )
    params = {k: v for k, v in params.items() if not k.startswith("bridge/out_proj/")}
  return params
