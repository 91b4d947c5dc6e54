"""Hugging Face -> vlm-jax: a LlavaForConditionalGeneration directory, or a fresh VLM assembled
from an LLM directory and a vision-tower directory (stage 1: the bridge starts random).

A converted workdir is an ordinary one (config.json + checkpoints/0 holding the params) plus
`hf/`: the tokenizer and processor files, the HF config, and what export needs to write the model
back bit for bit (key layout, dtypes, and the tensors we do not run, e.g. the CLIP layer after
the one LLaVA reads).
"""

import dataclasses
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.build import flat_params
from vlm_jax.config import VLM_COMPONENTS
from vlm_jax.convert import hf_config, image_processor, layout as layout_lib, params as params_lib
from vlm_jax.convert import qformer as qformer_lib
from vlm_jax.convert.safetensors_io import INDEX, Reader, write_sharded
from vlm_jax.data import hf_tokenizer
from vlm_jax.errors import UserError
from vlm_jax.files import as_path, check_empty_dir, local_files, read_json
from vlm_jax.train import checkpoint as checkpoint_lib

log = logging.getLogger("vlm_jax")

SIDECAR = "hf"  # inside a converted workdir
META = "convert.json"
EXTRAS = "extras.safetensors"
CHECKPOINT_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}  # config.json's "dtype"


def components(model_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The parts a LLaVA file holds for this model: AnyRes (LLaVA-NeXT) adds image_newline."""
  return VLM_COMPONENTS + (("image_newline",) if model_cfg.anyres.enabled else ())


def slots(model_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  return components(model_cfg) + ("llm_head",)


# Copied beside the weights so that the tokenizer, processor and generation settings travel.
AUX_FILES = hf_tokenizer.FILES + ("preprocessor_config.json", "processor_config.json", "generation_config.json")


def is_hf_dir(path: str) -> bool:
  """A Hugging Face model directory (local or gs://): config.json and safetensors weights."""
  root = as_path(path) if path else None
  return bool(
    root
    and root.is_dir()
    and (root / "config.json").is_file()
    and not (root / "checkpoints").is_dir()
    and ((root / INDEX).is_file() or any(f.name.endswith(".safetensors") for f in root.iterdir()))
  )


@dataclasses.dataclass
class Origin:
  """How the model looked in HF, for export: config, key layout, dtypes, unused tensors."""

  files_dir: str | None  # tokenizer / processor files
  hf_config: dict | None
  layout: dict
  llm_family: str
  vision_layers: int  # the HF tower's blocks (we run config.model.vision.depth)
  image_token_id: int
  dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # HF key -> F32 / BF16 / ...
  extras_dir: str | None = None  # a directory whose *.safetensors hold extra_keys
  extra_keys: tuple[str, ...] = ()  # full HF keys of the tensors we keep but do not run

  @property
  def has_vision_head(self) -> bool:  # SigLIP's attention-pooling head
    return any(k.startswith(self.layout["vision"] + "head.") for k in self.extra_keys)

  def meta(self) -> dict:
    return dict(
      layout=self.layout,
      llm_family=self.llm_family,
      vision_layers=self.vision_layers,
      image_token_id=self.image_token_id,
      dtypes=self.dtypes,
      extra_keys=list(self.extra_keys),
    )


def _fill_config(
  base: ml_collections.ConfigDict | None,
  vision: dict,
  llm: dict,
  tokenizer,
  processor_dir: str,
  llava: bool,
  anyres: dict | None = None,
) -> ml_collections.ConfigDict:
  """base (or base()) with the model read from HF and the image processor of processor_dir; an
  assembled model keeps base's bridge kind."""
  config = config_lib.base() if base is None else base
  config.model.vision.update(vision)
  config.model.llm.update(llm)
  if base is None:  # rows no longer than the context (a base's are its own to check)
    config.data.seq_len = min(config.data.seq_len, config.model.llm.max_len)
  if anyres is not None:  # a LLaVA checkpoint says; an assembled model keeps base's
    config.model.anyres.update(anyres)
  if llava:
    config.model.bridge.kind = "mlp2x_gelu"
  config.data.template = "hf" if tokenizer.chat_template else "simple"
  config.data.update(
    image_processor.read(processor_dir, vision["flavour"], vision["image_size"], config.model.anyres.enabled)
  )
  build_lib.validate(config)
  return config


def _read_into(reader: Reader, config, run, layout, components, where: str, grow_vocab: bool = False):
  """Checks, then reads the components' params into the run's shardings: ({path: array}, items)."""
  return read_components(
    reader, config.model, run.abstract_params, run.param_shardings, layout, components, where, grow_vocab
  )


def read_components(
  reader: Reader, model_cfg, abstract_params, shardings, layout, components, where: str, grow_vocab: bool = False
):
  """Checks, then reads the components' params in their shardings: ({path: array}, items)."""
  shapes = {k: v.shape for k, v in flat_params(abstract_params).items()}
  items = params_lib.plan(model_cfg, layout, shapes, components)
  params_lib.check(reader, items, where, grow_vocab)
  t0 = time.time()
  out = params_lib.read(reader, items, flat_params(shardings))
  log.info("read %d tensors of %s in %.1fs", sum(len(i.keys) for i in items), where, time.time() - t0)
  return out, items


def read_llava_params(directory: str, model_cfg: ml_collections.ConfigDict, abstract_params, shardings) -> dict:
  """A LLaVA directory's params for a model config built elsewhere (config.model.init_from):
  every tensor must have the shape the config implies."""
  with Reader(directory) as reader:
    layout = layout_lib.detect(reader.keys(), slots(model_cfg), directory)
    out, _ = read_components(reader, model_cfg, abstract_params, shardings, layout, components(model_cfg), directory)
  return params_lib.unflatten(out)


def load_params(path: str, run: build_lib.Run) -> dict:
  """config.model.init_from for vlm_jax.api.train: a Hugging Face LLaVA directory, else a
  workdir or one of its step directories, read into the run's shardings."""
  if is_hf_dir(path):
    return read_llava_params(path, run.config.model, run.abstract_params, run.param_shardings)
  return checkpoint_lib.load_params(path, run)


def _unused(reader: Reader, items, layout, slots: tuple[str, ...] | None, skip: str | None = None) -> list[str]:
  """Keys of the given slots (all if None) that no param consumed."""
  used = params_lib.consumed(items)
  return [
    k
    for k in reader.keys()
    if k not in used and k != skip and (slots is None or layout_lib.component_of(k, layout)[0] in slots)
  ]


# --- LLaVA directories -----------------------------------------------------------------------
def llava_config(directory: str, dtype: str | None = None, base: ml_collections.ConfigDict | None = None):
  """A LLaVA directory's (config, tokenizer, config.json): the model and image processor it
  describes, computing in `dtype` (None: the checkpoint's, as transformers' dtype "auto")."""
  files = local_files(directory)  # config, tokenizer and processor (a bucket's copied here)
  hc = read_json(files)
  info = hf_config.llava_from_hf(hc, f"{directory}/config.json")
  tokenizer = hf_tokenizer.load(files)
  if tokenizer.image_id != info["image_token_id"]:
    raise UserError(
      f"{directory}: the tokenizer's <image> is id {tokenizer.image_id}, config.json's "
      f"image_token_id is {info['image_token_id']}"
    )
  config = _fill_config(base, info["vision"], info["llm"], tokenizer, files, llava=True, anyres=info["anyres"])
  config.data.tokenizer = directory
  if dtype is None and base is None:
    # Computing in the checkpoint's dtype, as transformers loads it (dtype "auto"): an fp32
    # checkpoint gives transformers' fp32 tokens; a bf16 one runs in bf16 as before.
    dtype = CHECKPOINT_DTYPES.get(hc.get("dtype") or hc.get("torch_dtype"))
  if dtype:
    config.model.dtype = dtype
  build_lib.resolve_model_config(config, tokenizer.vocab_size)
  return config, tokenizer, hc


def open_llava(directory: str, dtype: str | None = None, base: ml_collections.ConfigDict | None = None):
  """A LLaVA directory loaded for use: (config, tokenizer, run, params, origin); each param goes
  straight into its sharding on an FSDP mesh over the local devices."""
  config, tokenizer, hc = llava_config(directory, dtype, base)
  info = hf_config.llava_from_hf(hc, f"{directory}/config.json")
  run = build_lib.build(config, parallel.inference_mesh(), tokenizer.image_id)
  with Reader(directory) as reader:
    layout = layout_lib.detect(reader.keys(), slots(config.model), directory)
    flat_params, items = _read_into(reader, config, run, layout, components(config.model), directory)
    # A tied head stored anyway is the embedding again: never keep a copy that training leaves stale.
    tied = layout["llm_head"] + "lm_head.weight" if config.model.llm.tie_embeddings else None
    origin = Origin(
      directory,
      hc,
      layout,
      info["llm_family"],
      info["vision_layers"],
      info["image_token_id"],
      {k: reader.dtype(k) for k in reader.keys()},
      directory,
      tuple(_unused(reader, items, layout, None, tied)),
    )
  return config, tokenizer, run, params_lib.unflatten(flat_params), origin


# --- Writing a converted workdir -------------------------------------------------------------
def _save_extras(origin: Origin, sidecar: str, renames: dict[str, str]) -> None:
  """The unused tensors in one file, under their keys in origin's layout (small: a layer, a head)."""
  if not origin.extra_keys:
    return
  tmp = os.path.join(sidecar, "_extras")
  with Reader(origin.extras_dir) as reader:
    tensors = {}
    for key in origin.extra_keys:
      src = renames.get(key, key)
      tensors[key] = (reader.shape(src), reader.get(src).dtype, lambda src=src: reader.get(src))
    write_sharded(tmp, tensors, max_shard_bytes=1 << 62)
  os.replace(os.path.join(tmp, "model.safetensors"), os.path.join(sidecar, EXTRAS))
  os.rmdir(tmp)


def write_workdir(
  out: str, config: ml_collections.ConfigDict, params, origin: Origin, tokenizer, renames: dict[str, str] | None = None
) -> str:
  """config.json + checkpoints/0 (params only) + hf/ (files, HF config, meta, extras)."""
  sidecar = write_sidecar(out, origin.files_dir, origin.hf_config, tokenizer, META, origin.meta())
  _save_extras(origin, sidecar, renames or {})
  return save_converted(out, config, params)


def write_sidecar(
  out: str, files_dir: str | None, hf_config: dict | None, tokenizer, meta_name: str, meta: dict
) -> str:
  """out/hf/: the tokenizer and processor files of files_dir, the HF config and the meta file."""
  sidecar = os.path.join(out, SIDECAR)
  os.makedirs(sidecar, exist_ok=True)
  copy_aux_files(files_dir, sidecar)
  if isinstance(tokenizer, hf_tokenizer.HFTokenizer):
    tokenizer.save(sidecar)  # as used: with <image> when assembly added it
  with open(os.path.join(sidecar, "config.json"), "w") as f:
    json.dump(hf_config or {}, f, indent=2)
  with open(os.path.join(sidecar, meta_name), "w") as f:
    json.dump(meta, f, indent=2)
  return sidecar


def copy_aux_files(src: str | None, dst: str, names: tuple[str, ...] = AUX_FILES) -> None:
  """The tokenizer, processor and generation files (AUX_FILES) that src (local or gs://) has."""
  for name in names:
    if src and (as_path(src) / name).is_file():
      with open(os.path.join(dst, name), "wb") as f:
        f.write((as_path(src) / name).read_bytes())


def save_converted(out: str, config: ml_collections.ConfigDict, params, own_tokenizer: bool = True) -> str:
  """out/config.json and checkpoints/0 holding the params; own_tokenizer: the config's tokenizer
  is the one in the sidecar."""
  if own_tokenizer:
    config.data.tokenizer = SIDECAR  # relative to the workdir; vlm_jax.load resolves it there
  with open(os.path.join(out, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))
  checkpoints = checkpoint_lib.Checkpointer(os.path.join(out, "checkpoints"))
  checkpoints.save(0, {"step": jnp.zeros((), jnp.int32), "params": params}, {"converted": True})
  checkpoints.wait()
  checkpoints.close()
  return out


def convert_llava(directory: str, out: str, base: ml_collections.ConfigDict | None = None) -> str:
  """`vlm-jax convert --from-hf DIR --out OUT`."""
  check_empty_dir(out, "--out")  # before any reading: nothing is written unless all can be
  config, tokenizer, _, params, origin = open_llava(directory, base=base)
  return write_workdir(out, config, params, origin, tokenizer)


def load_origin(workdir: str) -> Origin | None:
  """The Origin saved in a converted workdir (None for a model trained here from scratch)."""
  sidecar = os.path.join(workdir, SIDECAR)
  meta = read_json(sidecar, META, required=False) if os.path.isdir(sidecar) else None
  if meta is None:
    return None
  return Origin(
    sidecar,
    read_json(sidecar, "config.json"),
    meta["layout"],
    meta["llm_family"],
    meta["vision_layers"],
    meta["image_token_id"],
    meta["dtypes"],
    sidecar if meta["extra_keys"] else None,
    tuple(meta["extra_keys"]),
  )


# --- Stage-1 assembly: an LLM directory + a vision-tower directory --------------------------
def assemble(
  llm_dir: str,
  vision_dir: str,
  out: str,
  *,
  feature_layer: int = -2,
  base: ml_collections.ConfigDict | None = None,
  qformer_dir: str | None = None,
) -> str:
  """`vlm-jax convert --from-hf LLM_DIR --vision VISION_DIR --out OUT`: the LLM and the vision
  tower (CLIP/SigLIP, alone or inside a CLIPModel/SiglipModel) from HF, and a bridge of
  config.model.bridge.kind (mlp2x_gelu unless base says otherwise) initialised from config.seed.
  With qformer_dir (`--qformer`, a BLIP-2 directory) the bridge is BLIP-2's Q-Former (its
  projection too when its LLM has this one's width). The tokenizer gains <image> if it has none;
  new vocab rows start as the mean row."""
  check_empty_dir(out, "--out")
  if qformer_dir is not None:  # before the run is built: it must have BLIP-2's bridge
    base = config_lib.base() if base is None else base
    base.model.bridge.update(qformer_lib.bridge_config(qformer_dir))
  vc, tc = read_json(vision_dir), read_json(llm_dir)
  vc = vc["vision_config"] if isinstance(vc.get("vision_config"), dict) else vc
  flavour = hf_config.VISION_FAMILIES.get(vc.get("model_type"), ("clip",))[0]
  vision, n_layers = hf_config.vision_from_hf(
    vc, feature_layer, "default" if flavour == "clip" else "full", f"{vision_dir}/config.json"
  )
  llm, family = hf_config.llm_from_hf(tc, f"{llm_dir}/config.json")
  tokenizer = hf_tokenizer.load(local_files(llm_dir), add_image=True)
  llm["vocab_size"] = max(llm["vocab_size"], tokenizer.vocab_size)
  config = _fill_config(base, vision, llm, tokenizer, vision_dir, llava=False)
  qformer = (
    {}
    if qformer_dir is None
    else qformer_lib.read_bridge(  # its errors before the long reads
      qformer_dir, config.model.bridge, config.model.vision.width, config.model.llm.width
    )
  )
  run = build_lib.build(config, parallel.inference_mesh(), tokenizer.image_id)
  layout = dict(layout_lib.LLAVA)  # export writes the hub's LLaVA layout
  dtypes, renames = {}, {}
  params = {}
  for directory, slots, components in (
    (vision_dir, ("vision",), ("vision",)),
    (llm_dir, ("llm", "llm_head"), ("llm",)),
  ):
    with Reader(directory) as reader:
      src_layout = layout_lib.detect(reader.keys(), slots, directory)
      got, items = _read_into(reader, config, run, src_layout, components, directory, grow_vocab=True)
      params.update(got)
      for key in reader.keys():
        slot, rel = layout_lib.component_of(key, src_layout)
        if slot in slots:
          dtypes[layout[slot] + rel] = reader.dtype(key)
      if components == ("vision",):
        renames = {
          layout["vision"] + k[len(src_layout["vision"]) :]: k for k in _unused(reader, items, src_layout, slots)
        }
  if tokenizer.vocab_size > tc.get("vocab_size", 0):  # grown: no longer the file's tensors
    dtypes = {k: v for k, v in dtypes.items() if not k.endswith(("embed_tokens.weight", "lm_head.weight"))}
  params.update(_fresh_parts(run, config.seed))
  shardings = flat_params(run.param_shardings)
  for path, host in qformer.items():  # fresh params stay for what BLIP-2 cannot give (its projection)
    params[path] = jax.make_array_from_callback(host.shape, shardings[path], lambda idx, h=host: h[idx])
  origin = Origin(
    llm_dir,
    {"text_config": tc, "vision_config": vc},
    layout,
    family,
    n_layers,
    tokenizer.image_id,
    dtypes,
    vision_dir,
    tuple(renames),
  )
  write_workdir(out, config, params_lib.unflatten(params), origin, tokenizer, renames)
  copy_aux_files(vision_dir, os.path.join(out, SIDECAR), ("preprocessor_config.json",))  # the image side is the tower's
  return out


def _fresh_parts(run, seed: int) -> dict:
  """The params an LLM and a vision tower do not hold (the bridge; AnyRes's image_newline; the
  cross-attention blocks), from the model's own initialisers, created in their shardings (XLA
  drops the rest of the init: its outputs are unused)."""
  plain = run.plain
  shardings = {k: s for k, s in flat_params(plain.param_shardings).items() if k.split("/")[0] not in ("vision", "llm")}
  inputs = plain.task.dummy_inputs(plain.config, 1)
  init = jax.jit(
    lambda key: {
      k: x for k, x in flat_params(nn.meta.unbox(plain.model.init(key, *inputs)["params"])).items() if k in shardings
    },
    out_shardings=shardings,
  )
  with build_lib.tracing_context(plain.mesh):
    return init(jax.random.key(seed))
