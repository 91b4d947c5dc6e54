"""Hugging Face CLIPModel / SiglipModel <-> a vlm-jax contrastive model (config.task "contrastive",
models/contrastive.py), one tensor to one param through the key tables (tables.CONTRASTIVE).

A converted workdir is laid out as LLaVA's (hf_import): config.json, checkpoints/0 and hf/ with
the tokenizer and processor files, the HF config and the tensors' dtypes (contrastive.json), so
an imported model is written back with its own config fields and dtypes. Our data pipeline's
tokenizers have <image> (never in a caption): one that lacks it gains it, and the text embedding
a mean row where the vocabulary was full (as `convert --vision` grows an LLM's).
"""

import dataclasses
import logging
import os

import ml_collections
import numpy as np

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.build import flat_params
from vlm_jax.convert import hf_config, hf_export, hf_import, image_processor, params as params_lib, tables
from vlm_jax.convert import workdir as workdir_lib
from vlm_jax.convert.safetensors_io import Reader, Tensor, write_sharded
from vlm_jax.data import hf_tokenizer
from vlm_jax.errors import UserError
from vlm_jax.files import check_empty_dir, local_files, read_json
from vlm_jax.models import contrastive as model_lib
from vlm_jax.train import checkpoint as checkpoint_lib

log = logging.getLogger("vlm_jax")

META = "contrastive.json"  # in the workdir's hf/: the tensors' dtypes
LEGACY_EOS = 2  # transformers' CLIP pools the highest id when eos_token_id is 2 (checkpoints before its PR #24773)


@dataclasses.dataclass(frozen=True)
class HFFamily:
  architecture: str
  text_model_type: str
  text_defaults: dict  # the HF text config class's defaults of the fields read here
  pools: tuple[str, ...]  # the text pools (model_lib.TEXT_POOLS) transformers' model reads


_TEXT = dict(
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  layer_norm_eps=1e-5,
  hidden_act="quick_gelu",
  vocab_size=49408,
  eos_token_id=49407,
)
FAMILIES = {  # HF model_type == our config.model.contrastive.family
  "clip": HFFamily("CLIPModel", "clip_text_model", _TEXT, ("eos", "argmax")),
  "siglip": HFFamily(
    "SiglipModel",
    "siglip_text_model",
    {
      **_TEXT,
      "hidden_size": 768,
      "intermediate_size": 3072,
      "num_attention_heads": 12,
      "max_position_embeddings": 64,
      "layer_norm_eps": 1e-6,
      "hidden_act": "gelu_pytorch_tanh",
      "vocab_size": 32000,
    },
    ("last",),
  ),
}
CLIP_PROJECTION_DIM = 512  # CLIPConfig's default
# The key prefix of each component (and of CLIP's text_projection, the "root" slot).
LAYOUT = {
  "vision": "vision_model.",
  "image_head": "vision_model.head.",
  "image_projection": "",
  "text": "text_model.",
  "root": "",
  "logit_scale": "",
  "logit_bias": "",
}
# torch.nn.MultiheadAttention's fused q, k, v (SigLIP's head); the tables name each part KEY[q].
FUSED = ("in_proj_weight", "in_proj_bias")
PARTS = "qkv"


def components(model_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  return ("vision",) + tuple(tables.CONTRASTIVE[model_cfg.contrastive.family])


# --- Config ------------------------------------------------------------------------------------
def _text_from_hf(tc: dict, family: str, where: str) -> dict:
  """HF text config -> our config.model.text fields."""
  get = hf_config.getter(tc, FAMILIES[family].text_defaults)
  act, eos = get("hidden_act"), get("eos_token_id")
  if act not in hf_config.ACT_FROM_HF:
    raise UserError(f"{where}.hidden_act: {act!r} is not supported ({', '.join(hf_config.ACT_FROM_HF)})")
  if family == "clip" and not isinstance(eos, int):
    raise UserError(f"{where}.eos_token_id: {eos!r} is not supported (one id: CLIP pools its first occurrence)")
  default_act = hf_config.FLAVOUR_ACT[model_lib.FAMILIES[family].vision_flavour]
  return dict(
    vocab_size=get("vocab_size"),
    width=get("hidden_size"),
    depth=get("num_hidden_layers"),
    heads=get("num_attention_heads"),
    mlp_dim=get("intermediate_size"),
    norm_eps=float(get("layer_norm_eps")),
    max_len=get("max_position_embeddings"),
    act="" if hf_config.ACT_FROM_HF[act] == default_act else hf_config.ACT_FROM_HF[act],
    pool="argmax" if family == "clip" and eos == LEGACY_EOS else "",
    eos_id=eos if isinstance(eos, int) else -1,
  )


def model_from_hf(hc: dict, where: str) -> dict:
  """A CLIPModel / SiglipModel config.json -> our config.model's {"contrastive", "vision", "text"}."""
  family = hc.get("model_type")
  if family not in FAMILIES:
    raise UserError(f"{where}.model_type: {family!r} is not a contrastive model ({', '.join(FAMILIES)})")
  vc = {"model_type": hf_config.FLAVOUR_MODEL_TYPE[family], **(hc.get("vision_config") or {})}
  vision, _ = hf_config.vision_from_hf(vc, -1, "full", f"{where}.vision_config")
  vision["final_norm"] = True  # both pool after post_layernorm
  tc = hc.get("text_config") or {}
  text = _text_from_hf(tc, family, f"{where}.text_config")
  embed_dim = 0
  if family == "clip":
    embed_dim = hc.get("projection_dim") or CLIP_PROJECTION_DIM
  else:
    if not vc.get("vision_use_head", True):
      raise UserError(
        f"{where}.vision_config.vision_use_head: false is not supported (SiglipModel pools "
        "the image with its attention head)"
      )
    projection = tc.get("projection_size") or text["width"]
    if projection != vision["width"]:
      raise UserError(
        f"{where}.text_config.projection_size: {projection}, but SigLIP's image embedding is "
        f"the vision hidden_size ({vision['width']}); both must be one width"
      )
  return dict(contrastive=dict(family=family, loss="", embed_dim=embed_dim), vision=vision, text=text)


def _eos_to_hf(m: ml_collections.ConfigDict, hf: HFFamily) -> int | None:
  """text_config.eos_token_id for our text pool (None: leave the base's)."""
  pool = model_lib.text_pool(m)
  if pool not in hf.pools:
    raise UserError(
      f"config.model.text.pool: {pool!r} cannot be written as a HF {hf.architecture} "
      f"(which reads {' or '.join(hf.pools)})"
    )
  if pool == "argmax":
    return LEGACY_EOS
  if pool == "eos" and m.text.eos_id == LEGACY_EOS:
    raise UserError(
      f"config.model.text.eos_id: {LEGACY_EOS} makes transformers' CLIP pool the highest id "
      "instead (its legacy checkpoints); set config.model.text.pool 'argmax', or another id"
    )
  return m.text.eos_id if m.text.eos_id >= 0 else None


def model_to_hf(m: ml_collections.ConfigDict, base: dict | None = None) -> dict:
  """Our config.model -> a CLIPModel / SiglipModel config.json dict (on top of `base`, the one it
  was read from)."""
  family = m.contrastive.family
  hf, ours = FAMILIES[family], model_lib.family(m)
  if model_lib.loss_kind(m) != ours.loss:
    raise UserError(
      f"config.model.contrastive.loss: {model_lib.loss_kind(m)!r} cannot be written as a HF "
      f"{hf.architecture} (whose loss is {ours.loss!r})"
    )
  if not m.vision.final_norm:
    raise UserError(
      f"config.model.vision.final_norm: a HF {hf.architecture} pools after post_layernorm, so a "
      "tower without it cannot be written as one"
    )
  out = dict(base or {})
  t = m.text
  text = dict(out.get("text_config") or {})
  text.update(
    model_type=hf.text_model_type,
    vocab_size=t.vocab_size,
    hidden_size=t.width,
    intermediate_size=t.mlp_dim,
    num_hidden_layers=t.depth,
    num_attention_heads=t.heads,
    max_position_embeddings=t.max_len,
    layer_norm_eps=t.norm_eps,
    hidden_act=hf_config.ACT_TO_HF[t.act or hf_config.FLAVOUR_ACT[ours.vision_flavour]],
  )
  eos = _eos_to_hf(m, hf)
  if eos is not None:
    text["eos_token_id"] = eos
  if family == "siglip":
    text["projection_size"] = model_lib.embed_dim(m)
  else:
    out["projection_dim"] = model_lib.embed_dim(m)
  vision = hf_config.vision_tower_to_hf(m.vision, m.vision.depth, out.get("vision_config"), has_head=True)
  out.update(architectures=[hf.architecture], model_type=family, text_config=text, vision_config=vision)
  return out


def _tokenizer(directory: str, config: ml_collections.ConfigDict) -> hf_tokenizer.HFTokenizer | None:
  """The directory's tokenizer with <image>, the text vocabulary grown to hold it; None (a warning)
  when it has none."""
  if not any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "tokenizer.model")):
    log.warning(
      "%s: no tokenizer (tokenizer.json or tokenizer.model); config.data.tokenizer stays %r: set it "
      "(convert --config) to the one the model was trained with",
      directory,
      config.data.tokenizer,
    )
    return None
  tokenizer = hf_tokenizer.load(directory, add_image=True)
  model_cfg, text = config.model, config.model.text
  if model_lib.text_pool(model_cfg) == "eos" and tokenizer.eos_id != text.eos_id:
    raise UserError(
      f"{directory}/config.json.text_config.eos_token_id: {text.eos_id}, but the tokenizer's EOS "
      f"is id {tokenizer.eos_id} (the text embedding is read at the first EOS)"
    )
  text.vocab_size = max(text.vocab_size, tokenizer.vocab_size)
  return tokenizer


def read_config(directory: str, base: ml_collections.ConfigDict | None = None):
  """A CLIPModel / SiglipModel directory's (config, tokenizer or None, config.json): base (or
  base()) with task contrastive, the model and image processor the directory describes, and
  captions as long as the text tower's positions (both families are trained on padded ones)."""
  hc = read_json(directory)
  model = model_from_hf(hc, f"{directory}/config.json")
  config = config_lib.base() if base is None else base
  config.task = "contrastive"
  for name, fields in model.items():
    config.model[name].update(fields)
  dtype = hf_import.CHECKPOINT_DTYPES.get(hc.get("dtype") or hc.get("torch_dtype"))
  if dtype and base is None:  # computing in the checkpoint's dtype, as transformers' dtype "auto"
    config.model.dtype = dtype
  v = config.model.vision
  config.data.update(image_processor.read(directory, v.flavour, v.image_size, False))
  if base is None or config.data.seq_len > config.model.text.max_len:
    config.data.seq_len = config.model.text.max_len
  tokenizer = _tokenizer(local_files(directory), config)  # a bucket's tokenizer files copied here
  if tokenizer is not None:
    config.data.tokenizer = directory
  build_lib.validate(config)
  return config, tokenizer, hc


# --- Tensors -----------------------------------------------------------------------------------
def _part(key: str) -> tuple[str, int] | None:
  """ "...in_proj_weight[k]" -> ("...in_proj_weight", 1); None for a key of the file."""
  if len(key) > 3 and key[-3] == "[" and key[-1] == "]" and key[-2] in PARTS:
    return key[:-3], PARTS.index(key[-2])
  return None


class Unfused:
  """A Reader that shows each fused q, k, v tensor (FUSED) as its parts KEY[q], KEY[k], KEY[v]."""

  def __init__(self, reader: Reader):
    self.reader = reader

  def keys(self) -> list[str]:
    out = []
    for key in self.reader.keys():
      out += [f"{key}[{p}]" for p in PARTS] if key.endswith(FUSED) else [key]
    return out

  def __contains__(self, key: str) -> bool:
    part = _part(key)
    return (part[0] if part else key) in self.reader

  def file_of(self, key: str) -> str:
    return self.reader.file_of((_part(key) or (key,))[0])

  def shape(self, key: str) -> tuple[int, ...]:
    part = _part(key)
    if part is None:
      return self.reader.shape(key)
    shape = self.reader.shape(part[0])
    rows, rest = divmod(shape[0], len(PARTS))
    return shape if rest else (rows,) + shape[1:]  # one that does not split: a mismatch, named

  def get(self, key: str) -> np.ndarray:
    part = _part(key)
    return self.reader.get(key) if part is None else np.split(self.reader.get(part[0]), len(PARTS))[part[1]]


def fuse(tensors: dict[str, Tensor], dtype_of) -> dict[str, Tensor]:
  """Export's inverse of Unfused: each KEY[q], KEY[k], KEY[v] -> KEY, stacked on the first axis."""
  out, groups = {}, {}
  for key, tensor in tensors.items():
    part = _part(key)
    if part is None:
      out[key] = tensor
    else:
      groups.setdefault(part[0], [None] * len(PARTS))[part[1]] = tensor
  for key, parts in groups.items():
    (rows, *rest), _, _ = parts[0]
    out[key] = (
      (rows * len(parts), *rest),
      dtype_of(key),
      lambda parts=parts: np.concatenate([produce() for _, _, produce in parts]),
    )
  return out


def open_hf(directory: str, base: ml_collections.ConfigDict | None = None):
  """A CLIPModel / SiglipModel directory loaded: (config, tokenizer or None, run, params, config.json,
  {HF key: dtype}); each param goes straight into its sharding on an FSDP mesh over the local devices."""
  config, tokenizer, hc = read_config(directory, base)
  run = build_lib.build(config, parallel.inference_mesh(), tokenizer.image_id if tokenizer else -1)
  with Reader(directory) as reader:
    view = Unfused(reader)
    flat, items = _read_params(view, run, directory)
    dtypes = {k: reader.dtype(k) for k in reader.keys()}
    used = params_lib.consumed(items)
    unused = [k for k in view.keys() if k not in used and not k.endswith("position_ids")]
  if unused:  # (position_ids: a buffer older checkpoints saved, derived again on load)
    log.warning(
      "%s: %d tensors are not part of a %s and are left out: %s",
      directory,
      len(unused),
      FAMILIES[config.model.contrastive.family].architecture,
      ", ".join(unused[:8]),
    )
  return config, tokenizer, run, params_lib.unflatten(flat), hc, dtypes


def convert(directory: str, out: str, base: ml_collections.ConfigDict | None = None) -> str:
  """`vlm-jax convert --from-hf CLIP_OR_SIGLIP_DIR --out OUT`: a contrastive workdir."""
  check_empty_dir(out, "--out")  # before any reading: nothing is written unless all can be
  config, tokenizer, _, params, hc, dtypes = open_hf(directory, base)
  hf_import.write_sidecar(out, directory, hc, tokenizer, META, {"dtypes": dtypes})
  return hf_import.save_converted(out, config, params, own_tokenizer=tokenizer is not None)


def load_params(path: str, run: build_lib.Run) -> dict:
  """config.model.init_from of a contrastive run: a CLIPModel / SiglipModel directory, else a
  workdir or one of its step directories, read into the run's shardings."""
  if not hf_import.is_hf_dir(path):
    return checkpoint_lib.load_params(path, run)
  with Reader(path) as reader:
    flat, _ = _read_params(Unfused(reader), run, path)
  return params_lib.unflatten(flat)


def _read_params(view: Unfused, run: build_lib.Run, where: str):
  """({path: array}, items) of the run's model from the file view, in the run's shardings."""
  return hf_import.read_components(
    view,
    run.config.model,
    run.abstract_params,
    run.param_shardings,
    LAYOUT,
    components(run.config.model),
    where,
    grow_vocab=True,
  )


# --- Export ------------------------------------------------------------------------------------
def export(
  config, tokenizer, params, sidecar: str | None, out: str, dtype: str | None = None, max_shard_bytes: int = 4 << 30
) -> str:
  """Writes the model as a HF CLIPModel / SiglipModel directory: on top of the HF config, files
  and dtypes of a converted workdir's sidecar (hf/), else from our config, the tokenizer's files
  and float32; dtype: float32 | bfloat16 | float16 for every tensor."""
  hf_export.check_out(out, dtype)
  meta = read_json(sidecar, META, required=False) if sidecar else None
  base = read_json(sidecar) if meta else None
  default, dtype_of = hf_export.tensor_dtypes(meta["dtypes"] if meta else {}, dtype)
  model = config.model
  hc = model_to_hf(model, base)
  hc.pop("torch_dtype", None)
  hc["dtype"] = hf_export.HF_DTYPE[default]
  for key, value in (
    ("bos_token_id", tokenizer.bos_id),
    ("pad_token_id", tokenizer.pad_id),
    ("eos_token_id", tokenizer.eos_id),
  ):
    hc["text_config"].setdefault(key, value)

  shapes = {k: v.shape for k, v in flat_params(params).items()}
  items = params_lib.plan(model, LAYOUT, shapes, components(model))
  os.makedirs(out, exist_ok=True)
  write_sharded(out, fuse(params_lib.hf_tensors(items, flat_params(params), dtype_of), dtype_of), max_shard_bytes)
  hf_export.write_json(out, "config.json", hc)
  if meta:
    hf_import.copy_aux_files(sidecar, out)
  else:
    hf_export.write_tokenizer(tokenizer, config, out)
  hf_export.write_processor(config, out)
  return out


def export_checkpoint(
  path: str,
  out: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 4 << 30,
  merge_lora: bool = False,
  peft: bool = False,
) -> str:
  """`vlm-jax convert --checkpoint WORKDIR --to-hf OUT` of a contrastive workdir (or step directory)."""
  hf_export.check_out(out, dtype)
  _, tokenizer, run, params, _, workdir = workdir_lib.open_workdir(path)
  config, params, adapters = hf_export.plain_model(run, params, merge_lora, peft)
  if adapters is not None:
    raise UserError("--peft: a contrastive model is written whole; give --merge-lora")
  sidecar = os.path.join(workdir, hf_import.SIDECAR)
  return export(config, tokenizer, params, sidecar if os.path.isdir(sidecar) else None, out, dtype, max_shard_bytes)
