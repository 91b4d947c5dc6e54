"""Config defaults, loading of config files, `--config.KEY=VALUE` overrides and validation.

Every config file builds on `base()`, so every run has every field; unknown fields are errors.
`validate` checks the fields themselves; the choices that name a registry entry (task, bridge
kind, vision flavour, activations, remat policy) are checked by the registries' owners
(build.validate).
"""

import ast
import importlib.util
import json
import os
import sys

import ml_collections

from vlm_jax import xla_options
from vlm_jax.errors import UserError

STAGES = ("stage1", "stage2", "full")
FROZEN_DTYPES = ("float32", "bfloat16")
LORA_BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
ROPE_TYPES = ("default", "linear", "llama3")
VLM_COMPONENTS = ("vision", "bridge", "llm")   # the VLM params tree's top-level parts
COMPONENTS = VLM_COMPONENTS + ("text",)      # what trains and its lr_mult; text: the contrastive task's tower
IMAGE_POSITIONS = ("before", "after")      # where <image> goes when a prompt does not say
# How an image becomes the ViT's square input (vlm_jax/data/images.py).
RESIZE_MODES = ("squash", "shortest_edge_crop", "pad_square")
# PIL's filter codes, which transformers' image processors store as `resample`.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What a batch holds and how the loss is made (vlm_jax/tasks.py): vlm (images + conversations,
  # next-token loss) | contrastive (image-caption pairs, CLIP / SigLIP loss; config.model.text)
  c.task = "vlm"
  c.stage = "full"            # stage1: bridge; stage2: bridge + llm; full: everything

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "bfloat16"  # compute dtype; params and optimizer state are fp32
  # What the backward pass recomputes (vlm_jax/models/layers.py REMAT_POLICIES): none | full |
  # dots | dots_with_no_batch_dims | offload (the latter's saved matmuls in host memory)
  c.model.remat = "none"
  # Ways to compute, each giving the same loss and gradients (README "Train-step speed"):
  # xla (reference) | blockwise | cudnn (GPU) | splash (TPU) | pallas_gpu | auto (the platform's
  # best: splash on TPU, cuDNN or pallas_gpu on GPU, blockwise on CPU); vlm_jax/models/attention.py
  c.model.attention = "auto"
  c.model.attention_block = 128    # blockwise: query positions per block
  c.model.scan_unroll = 1          # layers per iteration of the loop over layers; 0: unrolled
  c.model.loss_chunk = 256         # loss over supervised positions, this many per row at a time; 0: full logits
  # A checkpoint (workdir, step dir or Hugging Face LLaVA dir) whose params start a fresh run,
  # e.g. an LLM + vision tower assembled by `vlm-jax convert --vision` for stage 1. A resumed run
  # continues from its own checkpoint instead.
  c.model.init_from = ""
  c.model.vision = ml_collections.ConfigDict(dict(
      flavour="siglip", image_size=64, patch_size=8, width=128, depth=2, heads=4, mlp_dim=512,
      norm_eps=1e-6, keep_cls=False, final_norm=False,
      act="",                 # "" = the flavour's (quick_gelu for CLIP, gelu_tanh for SigLIP)
      # ToMe (models/token_merging.py): tokens merged per block, by bipartite soft matching with
      # proportional attention; the VLM reads depth * r fewer tokens (less at most half a block).
      # Needs a bridge that does not read the patch grid (linear, mlp2x_gelu, perceiver, qformer).
      token_merging=0,
      # A contrastive run's workdir (or step dir) whose ViT starts this run's, e.g. one trained by
      # configs/siglip_shapes.py; its first `depth` blocks are taken (LLaVA reads a layer before the last).
      init_from=""))
  # The contrastive task (vlm_jax/models/contrastive.py): its family fixes the pooling, heads and
  # loss as transformers' SiglipModel / CLIPModel; the text tower is config.model.text.
  c.model.contrastive = ml_collections.ConfigDict(dict(
      family="siglip",        # siglip | clip
      loss="",                # "" = the family's: siglip (sigmoid) | clip (softmax)
      embed_dim=0))           # the shared embedding's width (0 = the vision width; siglip: must be)
  c.model.text = ml_collections.ConfigDict(dict(
      vocab_size=0,           # 0: the tokenizer's vocabulary size
      width=128, depth=2, heads=4, mlp_dim=512, norm_eps=1e-6,
      max_len=64,             # positions (HF max_position_embeddings); captions are data.seq_len tokens
      act="",                 # "" = the family's vision flavour's
      pool="",                # "" = the family's: last (SigLIP) | eos (CLIP) | argmax (original CLIP)
      eos_id=-1))             # pool=eos: the end-of-text id (-1: the tokenizer's EOS)
  # AnyRes (LLaVA-NeXT) tiling, see vlm_jax/data/anyres.py: tiles of vision.image_size pixels.
  c.model.anyres = ml_collections.ConfigDict(dict(
      enabled=False,
      # Candidate canvases: (RxC) tile grids (rows x cols), "(1x1),...,(6x6)" for a range
      # (OneVision), or [[H, W], ...] in pixels as transformers' image_grid_pinpoints. LLaVA-NeXT's:
      grid_pinpoints="(1x2),(2x1),(2x2),(3x1),(1x3)",
      base_view=True,         # a downscaled whole-image tile first (S*S tokens)
      max_n=0,                # anyres_max_N: maps larger than N tiles are shrunk (OneVision: 9); 0 = off
      max_tiles=0))           # tiles per global batch (one ViT call); 0 = every row's largest plan
  # kinds (vlm_jax/models/bridge.py BRIDGES): linear, mlp2x_gelu (LLaVA-1.5), perceiver,
  # qformer (BLIP-2), cabstractor (Honeybee), pixel_shuffle (Idefics3, nanoVLM)
  c.model.bridge = ml_collections.ConfigDict(dict(
      kind="mlp2x_gelu",
      depth=2,                # perceiver, qformer: layers; cabstractor: ResBlocks before and after pooling
      heads=4,                # perceiver, qformer
      width=0,                # qformer, cabstractor: hidden width (0 = the LLM's)
      num_latents=16,         # perceiver: tokens per image
      num_queries=16,         # qformer: tokens per image (BLIP-2: 32)
      cross_attention_every=2,  # qformer: layers 0, k, 2k, ... cross-attend to the image (BLIP-2: 2)
      mlp_dim=0,              # qformer: MLP width (0 = 4 x width)
      norm_eps=1e-12,         # qformer: LayerNorm epsilon (BERT's)
      num_tokens=16,          # cabstractor: tokens per image after pooling, a square (Honeybee: 144)
      factor=2,               # pixel_shuffle: r x r patches per token (Idefics3: 3, SmolVLM: 4)
      projection="linear"))   # pixel_shuffle: linear (no bias, Idefics3) | mlp (two layers, GELU)
  # How the visual tokens reach the LLM (vlm_jax/models/fusion.py): tokens (LLaVA: written into the
  # sequence, image_tokens placeholders an image) | cross_attention (Flamingo: the sequence keeps
  # one <image> marker an image; gated cross-attention blocks between the LLM's layers read the
  # bridge's tokens of the latest image before each text token; config.model.cross_attention).
  c.model.fusion = "tokens"
  c.model.cross_attention = ml_collections.ConfigDict(dict(
      every=1,                # a block before every k-th LLM layer (layers k-1, 2k-1, ...; Flamingo-9B: 4)
      heads=0, head_dim=0,    # 0: the LLM's
      mlp_dim=0))             # the gated dense block's hidden width (0: 4 x llm.width)
  c.model.llm = ml_collections.ConfigDict(dict(
      vocab_size=0,           # 0: the tokenizer's vocabulary size
      width=128, depth=2, heads=4, kv_heads=2, head_dim=32, mlp_dim=512, rope_theta=10000.0,
      norm_eps=1e-6, tie_embeddings=False, qkv_bias=False,
      mlp_act="silu",         # silu (Llama, Qwen2, Mistral) | gelu_tanh (Gemma)
      norm_offset=0.0,        # RMSNorm scales by (norm_offset + scale): Gemma stores scale - 1
      embed_scale=False,      # token embeddings times sqrt(width) (Gemma; visual tokens are not scaled)
      sliding_window=0,       # 0: full causal attention; W: each query sees its last W keys (Mistral)
      # RoPE frequency scaling: default | linear | llama3 (Llama 3.1+); HF's rope_parameters.
      rope_type="default", rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      rope_original_max_len=8192,
      max_len=2048))          # context: prompt + answer tokens generation accepts (HF max_position_embeddings)

  c.data = ml_collections.ConfigDict()
  c.data.sources = "shapes"
  c.data.tokenizer = "shapes"
  c.data.template = "simple"
  c.data.image_position = "before"  # where <image> goes when a prompt or sample does not say
  c.data.seq_len = 128
  # The image processor (vlm_jax/data/images.py; import reads the checkpoint's): squash |
  # shortest_edge_crop | pad_square, each ending at the ViT's image_size. AnyRes tiles itself
  # (its base view is squashed).
  c.data.image_resize = "squash"
  c.data.image_short_side = 0       # shortest_edge_crop / pad_square: short side before the crop (0 = image_size)
  c.data.image_fill = ()            # pad_square colour, RGB 0-255; () = int(image_mean * 255)
  c.data.image_resample = "bicubic"  # nearest | lanczos | bilinear | bicubic | box | hamming
  c.data.image_mean = (0.5, 0.5, 0.5)
  c.data.image_std = (0.5, 0.5, 0.5)
  # Images go to the device as uint8 pixels and the model normalises them (a quarter of the
  # bytes); False: float32, normalised on the host. The same model input either way.
  c.data.images_uint8 = True
  c.data.strict = False      # True: a bad sample stops the run (else it is skipped and counted)
  c.data.pack = False        # several samples per row (segment ids, restarted positions)
  c.data.max_images = 1      # image slots per row (multi-image samples; packed rows share them)
  # Images per global batch through the ViT: rows fill a shared pool (per batch shard), so empty
  # image slots (text-only samples, packed rows with fewer images) cost no ViT work. 0: every
  # row's max_images slots, empty ones included. AnyRes pools its tiles (model.anyres.max_tiles).
  c.data.image_pool = 0
  c.data.workers = 0         # loader processes that prepare and batch (0: in the training process)
  c.data.threads = 4         # reader threads per loader process (image decode and resize)
  c.data.prefetch = 2        # batches prefetched per loader process
  c.data.tfds_dir = ""       # TFDS data_dir for tfds: specs ("" = TFDS_DATA_DIR or ~/tensorflow_datasets)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32     # global, summed over micro-batches
  c.train.grad_accum = 1      # micro-batches per step
  c.train.lr = 1e-3           # peak
  c.train.warmup_steps = 50
  c.train.end_lr_ratio = 0.1  # cosine decays to lr * end_lr_ratio
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  # Learning-rate multiplier per component (for the parts the stage trains).
  # (text: the contrastive task's text tower; its other params, heads and logit scale, count as bridge.)
  c.train.lr_mult = ml_collections.ConfigDict(dict(vision=1.0, bridge=1.0, llm=1.0, text=1.0))
  # Comma-separated regexes over param paths ("bridge/.*,llm/layers/.*"): if set, replaces the
  # stage's choice of what trains.
  c.train.trainable = ""
  # Storage of the params the stage freezes: bfloat16 halves their memory (stage 1: the LLM's);
  # the compute dtype reads them in bfloat16 anyway, so with model.dtype=bfloat16 only the norms'
  # scales, read in fp32, see the rounding.
  c.train.frozen_dtype = "float32"  # float32 | bfloat16
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.eval_examples = 256
  c.train.eval_batch_size = 64
  c.train.checkpoint_every = 200
  c.train.max_to_keep = 2

  # LoRA / QLoRA (vlm_jax/models/lora.py, README "LoRA and QLoRA"); rank 0: off. With it on, a
  # component with adapters trains only them; the others train as the stage says.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0,
      dropout=0.0,            # on the adapters' input, as PEFT's lora_dropout
      # Comma-separated regexes over module paths: llm/layers/(q|k|v|o|gate|up|down),
      # vision/layers/(q|k|v|o|fc1|fc2), bridge/linear_1, ...
      targets="llm/layers/(q|k|v|o|gate|up|down)",
      base_dtype="float32",   # the adapted kernels' storage: float32 | bfloat16 | int8 | nf4 (QLoRA)
      block_size=64))         # int8 / nf4: input rows per scale (QLoRA's 64); 0: one per output channel

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # XLA compiler options (vlm_jax/xla_options.py), how the step is scheduled, not what it computes.
  # The switches are for TPU and GPU; `flags`, "name=value,name=value", go to the compiler as they
  # are (TPU: true/false; GPU: True/False).
  c.xla = ml_collections.ConfigDict(dict(latency_hiding_scheduler=False, async_collectives=False, flags=""))

  # Periodic evals (big_vision style): name -> {data, metric, every, max_examples}, each logged
  # as eval/<name>/<metric> (vlm_jax/eval/runner.py); `--eval-data SPEC` replaces them all.
  c.evals = ml_collections.ConfigDict({"shapes_test": eval_entry("shapes:test")})
  return c


def eval_entry(data: str, metric: str = "auto", every: int = 0, max_examples: int = 0) -> ml_collections.ConfigDict:
  """One periodic eval: a data spec, a metric (auto | vqa | exact | mc | pope | shapes), every
  `every` steps (0: train.eval_every) on its first `max_examples` samples (0: train.eval_examples)."""
  return ml_collections.ConfigDict(dict(data=data, metric=metric, every=every, max_examples=max_examples))


def eval_name(spec: str) -> str:
  """The eval name of a data spec: 'shapes:test' -> 'shapes_test', 'llava:dir/vqa.jsonl' -> 'vqa'."""
  kind, _, rest = spec.partition(":")
  if kind == "llava" and rest:
    return os.path.splitext(os.path.basename(rest.partition(":")[0]))[0] or kind
  return spec.replace(":", "_").replace("/", "_")


def eval_entries(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """config.evals with their defaults filled in from config.train."""
  out = {}
  for name, entry in config.evals.items():
    entry = ml_collections.ConfigDict(entry.to_dict())
    entry.every = entry.every or config.train.eval_every
    entry.max_examples = entry.max_examples or config.train.eval_examples
    out[name] = entry
  return out


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config: file not found: {path}")
  module_spec = importlib.util.spec_from_file_location("_vlm_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # a config may build on its neighbours
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a user's file: report where, not a traceback
    raise UserError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from e
  finally:
    sys.path.pop(0)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config: {path} has no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    raise UserError(f"--config: {path}:{arg}: {e}") from e
  return config


def _parse_value(key: str, text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise UserError(f"--config.{key}: expected true/false, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}: cannot parse {text!r} as {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    value = type(current)(value)
  if current is not None and not isinstance(value, type(current)):
    raise UserError(f"--config.{key}: expected {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Applies {"train.lr": "1e-4", ...}; unknown fields and wrong types are errors."""
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    if len(parents) == 2 and parents[0] == "evals" and parents[1] not in config.evals and leaf in eval_entry(""):
      config.evals[parents[1]] = eval_entry("")  # --config.evals.NAME.data=SPEC adds an eval
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f"--config.{key}: unknown config field")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise UserError(f"--config.{key}: unknown config field")
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise UserError(f"--config.{key}: is a group; set one of its fields")
    node[leaf] = _parse_value(key, text, node[leaf])


def check_fields(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 prefix: str = "") -> None:
  """Every field of `config` must exist in the base config (typos are errors, not silent no-ops)."""
  for key, value in config.items():
    where = f"{prefix}{key}"
    if where.startswith("evals.") and where.count(".") == 1:  # a free name: check against an entry
      reference = ml_collections.ConfigDict({key: eval_entry("")})
    if key not in reference:
      raise UserError(f"config field {where}: unknown config field")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
      check_fields(value, reference[key], where + ".")


def check_one_of(field: str, value, choices) -> None:
  """A field whose value must be one of `choices` (a tuple or a registry's keys)."""
  if value not in choices:
    raise UserError(f"{field}: {value!r} is not one of {', '.join(choices)}")


def check_image_position(position: str) -> None:
  check_one_of("config.data.image_position", position, IMAGE_POSITIONS)


def check_lora(lora: ml_collections.ConfigDict) -> None:
  check_one_of("config.lora.base_dtype", lora.base_dtype, LORA_BASE_DTYPES)
  for name, ok in (("rank", lora.rank >= 0), ("alpha", lora.alpha > 0), ("dropout", 0 <= lora.dropout < 1),
                   ("block_size", lora.block_size >= 0)):
    if not ok:
      raise UserError(f"config.lora.{name}: {lora[name]} is out of range")


def validate(config: ml_collections.ConfigDict) -> None:
  check_fields(config, base())
  check_one_of("config.stage", config.stage, STAGES)
  check_one_of("config.train.frozen_dtype", config.train.frozen_dtype, FROZEN_DTYPES)
  check_lora(config.lora)
  check_image_position(config.data.image_position)
  m = config.model
  if m.vision.image_size % m.vision.patch_size:
    raise UserError("config.model.vision.image_size must be a multiple of patch_size")
  if m.vision.token_merging < 0:
    raise UserError(f"config.model.vision.token_merging must be >= 0 (tokens merged per ViT block; 0: off), "
                    f"got {m.vision.token_merging}")
  if m.vision.width % m.vision.heads:
    raise UserError("config.model.vision.width must be a multiple of heads")
  check_one_of("config.model.llm.rope_type", m.llm.rope_type, ROPE_TYPES)
  if m.llm.heads % m.llm.kv_heads:
    raise UserError("config.model.llm.heads must be a multiple of kv_heads")
  if m.attention_block < 1:
    raise UserError(f"config.model.attention_block must be >= 1, got {m.attention_block}")
  if m.loss_chunk < 0:
    raise UserError(f"config.model.loss_chunk must be >= 0 (0: full logits), got {m.loss_chunk}")
  if m.scan_unroll < 0:
    raise UserError(f"config.model.scan_unroll must be >= 0 (0: unrolled), got {m.scan_unroll}")
  _validate_images(config.data)
  xla_options.parse_flags(config.xla.flags)
  if config.data.image_pool < 0:
    raise UserError(f"config.data.image_pool must be >= 0 (0: every image slot), got {config.data.image_pool}")
  if m.anyres.enabled:
    _validate_anyres(m)
    if config.data.image_pool:
      raise UserError("config.data.image_pool: AnyRes pools its tiles itself (config.model.anyres.max_tiles); "
                      "leave it 0")
    if config.data.image_resize != "squash":
      raise UserError(f"config.data.image_resize: {config.data.image_resize!r} with AnyRes, which tiles the "
                      "image itself (its base view is squashed); leave it 'squash'")
  t = config.train
  for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
    if t[name] < 1:
      raise UserError(f"config.train.{name} must be >= 1, got {t[name]}")
  if t.batch_size % t.grad_accum:
    raise UserError(f"config.train.batch_size ({t.batch_size}) must be a multiple of grad_accum ({t.grad_accum})")
  for name in COMPONENTS:
    if t.lr_mult[name] < 0:
      raise UserError(f"config.train.lr_mult.{name} must be >= 0")
  for name, entry in config.evals.items():
    if not isinstance(entry, ml_collections.ConfigDict):
      raise UserError(f"config.evals.{name}: expected {{data, metric, every, max_examples}}, got {entry!r:.60}")
    for field, default in eval_entry("").items():  # a config file may give only some fields
      if field not in entry:
        entry[field] = default
    if not entry.data:
      raise UserError(f"config.evals.{name}.data: a data spec is needed (e.g. shapes:test)")
    for field in ("every", "max_examples"):
      if entry[field] < 0:
        raise UserError(f"config.evals.{name}.{field} must be >= 0 (0: config.train's), got {entry[field]}")


def _validate_images(d: ml_collections.ConfigDict) -> None:
  check_one_of("config.data.image_resize", d.image_resize, RESIZE_MODES)
  check_one_of("config.data.image_resample", d.image_resample, RESAMPLE)
  if d.image_short_side < 0:
    raise UserError(f"config.data.image_short_side must be >= 0, got {d.image_short_side}")
  if d.image_fill and (len(d.image_fill) != 3 or any(not isinstance(v, int) or not 0 <= v <= 255
                                                     for v in d.image_fill)):
    raise UserError(f"config.data.image_fill: {tuple(d.image_fill)} is not () or three integers 0-255")
  for name in ("image_mean", "image_std"):
    if len(d[name]) != 3:
      raise UserError(f"config.data.{name}: expected 3 values (R, G, B), got {tuple(d[name])}")
  if 0 in tuple(d.image_std):
    raise UserError(f"config.data.image_std: {tuple(d.image_std)} has a zero")


def _validate_anyres(m: ml_collections.ConfigDict) -> None:
  """What AnyRes needs of the fields; its grids and bridge are checked by build.validate."""
  if m.vision.keep_cls:
    raise UserError("config.model.anyres: tiles are patch grids; set config.model.vision.keep_cls=False")
  if m.anyres.max_n < 0 or m.anyres.max_tiles < 0:
    raise UserError("config.model.anyres.max_n and max_tiles must be >= 0")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of to_json: JSON lists come back as the base config's tuples. A run written before
  config.evals had its one eval in data.eval_sources."""
  saved = json.loads(text)
  config = base()
  legacy = saved.get("data", {}).pop("eval_sources", None)
  if legacy is not None:
    config.evals = ml_collections.ConfigDict({eval_name(legacy): eval_entry(legacy)} if legacy else {})
  saved_evals = saved.pop("evals", None)
  config.update(_retuple(saved, config))
  if saved_evals is not None:
    config.evals = ml_collections.ConfigDict({k: dict(eval_entry("").to_dict(), **v) for k, v in saved_evals.items()})
  return config


def _retuple(d: dict, reference) -> dict:
  out = {}
  for k, v in d.items():
    ref = reference[k] if isinstance(reference, ml_collections.ConfigDict) and k in reference else None
    if isinstance(v, dict):
      out[k] = _retuple(v, ref)
    elif isinstance(v, list) and isinstance(ref, tuple):
      out[k] = tuple(v)
    else:
      out[k] = v
  return out


def flatten(d: dict, prefix: str = "") -> dict:
  """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and tuples compare equal."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out
