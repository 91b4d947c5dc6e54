"""Ahead-of-time compilation of the train step for a TPU topology, on any machine (`vlm-jax compile`).

libtpu (the `jax[tpu]` extra) describes a slice's chips without the hardware
(jax.experimental.topologies); the step is lowered with abstract state and batch in their
shardings over a mesh of those chips and compiled by the TPU compiler, so its memory analysis
(per chip), cost analysis and collectives are the TPU's. As MaxText's train_compile: a run that
would not fit fails here, in a minute, not after a pod has been allocated. `gpu:GB` stands for
one GPU of that memory, with this machine's CPU compiler in place of the GPU's: an estimate.
"""

import contextlib
import dataclasses
import os
import re
import time

import jax
import ml_collections
import numpy as np

from vlm_jax import build as build_lib
from vlm_jax import parallel
from vlm_jax.data import pipeline
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer import generate
from vlm_jax.models import vlm
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.optim import FROZEN

GIB = 1 << 30
# device_kind -> (HBM bytes per chip a program may use, dense bf16 FLOP/s per chip). v5e and v6e:
# the "available HBM" libtpu's compiler states when it refuses a program (16 and 32 GiB chips);
# v4 and v5p: Cloud TPU's published HBM. Peaks: Cloud TPU's published specs.
CHIPS = {
  "TPU v4": (32 * GIB, 275e12),
  "TPU v5 lite": (int(15.75 * GIB), 197e12),  # v5e
  "TPU v5": (95 * GIB, 459e12),  # v5p
  "TPU v6 lite": (int(31.25 * GIB), 918e12),  # v6e (Trillium)
}
# Off a TPU VM, libtpu looks for the VM's metadata and prints errors when it finds none; the
# slice described by the topology name does not need it.
# ALLOW_MULTIPLE_LIBTPU_LOAD: compiling beside a process that holds the chips (a run on the VM).
_NO_TPU_VM = {
  "TPU_SKIP_MDS_QUERY": "1",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "TPU_ACCELERATOR_TYPE": "v5litepod-4",
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
GPU_PEAK_FLOPS = 989e12  # H100 dense bf16 (the LLaVA reference baseline's peak)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(r"=\s*\S+\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


@contextlib.contextmanager
def _off_tpu_vm():
  """_NO_TPU_VM in the environment while libtpu starts (it reads it then), the variables a user
  set kept; the process's environment is as it was afterwards."""
  added = {key: value for key, value in _NO_TPU_VM.items() if key not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


class DoesNotFit(Exception):
  """The TPU compiler's refusal: the program needs more HBM than a chip has."""

  def __init__(self, topology: str, chips: int, mesh: dict[str, int], message: str):
    super().__init__(message)
    self.topology, self.chips, self.mesh, self.message = topology, chips, mesh, message

  def to_json(self) -> dict:
    return {"topology": self.topology, "chips": self.chips, "mesh": self.mesh, "fits": False, "error": self.message}


@dataclasses.dataclass
class Report:
  topology: str
  chips: int
  device_kind: str
  mesh: dict[str, int]
  memory: "Memory"  # the train step's, per chip
  hbm_bytes: int
  flops_per_step: float  # per chip: the model's FLOPs (model_flops) / chips
  compiler_flops: float  # per chip, the compiler's cost analysis: it counts a loop body
  # (the scan over layers) once, so it undercounts a scanned model
  peak_flops: float  # per chip, dense bf16
  collectives: dict[str, int]
  pallas_kernels: int  # custom calls into Pallas TPU kernels (splash attention)
  compile_seconds: float
  generation: dict | None = None  # compile_generation's, where asked for

  @property
  def total_bytes(self) -> int:
    return self.memory.total_bytes

  @property
  def peak_bytes(self) -> int:
    """The larger of the train step's total and generation's."""
    return max(self.total_bytes, (self.generation or {}).get("total_bytes", 0))

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def roofline_seconds(self) -> float:
    """A lower bound on the step time: FLOPs at the chip's peak (not a measurement)."""
    return self.flops_per_step / self.peak_flops

  def to_json(self) -> dict:
    return {
      "topology": self.topology,
      "chips": self.chips,
      "device_kind": self.device_kind,
      "mesh": self.mesh,
      "per_chip": {**self.memory.to_json(), "hbm_bytes": self.hbm_bytes},
      "fits": self.fits,
      "flops_per_step": self.flops_per_step,
      "compiler_flops": self.compiler_flops,
      "roofline_step_seconds": self.roofline_seconds,
      "collectives": self.collectives,
      "pallas_kernels": self.pallas_kernels,
      "generation": self.generation,
      "compile_seconds": round(self.compile_seconds, 1),
    }


@dataclasses.dataclass(frozen=True)
class Target:
  devices: list
  device_kind: str
  hbm_bytes: int
  peak_flops: float


def target(name: str) -> Target:
  """The chips of a TPU slice such as "v5e:4x4", "v5p:2x2x1" or "v6e:2x2" (libtpu needed); or
  "gpu:80", one GPU of 80 GB, which this machine's CPU compiler stands in for (its memory
  analysis an estimate of the GPU's: the same buffers, not the GPU compiler's fusions)."""
  if name.startswith("gpu:"):
    gib = name[4:]
    if not gib.isdigit() or int(gib) < 1:
      raise UserError(f"--topology {name}: expected gpu:GB, e.g. gpu:80")
    return Target(
      jax.devices("cpu")[:1], f"GPU, {gib} GB (estimate from the CPU compiler)", int(gib) * 10**9, GPU_PEAK_FLOPS
    )
  try:
    from jax.experimental import topologies

    with _off_tpu_vm():
      devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  except ImportError as e:
    raise UserError(f"--topology {name}: needs libtpu (pip install 'jax[tpu]'): {e}") from None
  except Exception as e:  # libtpu's own message says what is wrong with the name
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f"--topology {name}: not a TPU topology libtpu knows (e.g. v5e:2x2, v5p:2x2x1, v6e:2x2) nor gpu:GB: {first}"
    ) from None
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise UserError(f"--topology {name}: no HBM figure for {kind!r} (known: {', '.join(CHIPS)})")
  return Target(list(devices), kind, *CHIPS[kind])


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict:
  """The global batch's shapes and dtypes, in the batch sharding: those of one batch the data
  pipeline makes for this config from the built-in `shapes` set (shapes do not depend on the data)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.update(
    dict(
      sources="shapes:wide" if c.model.anyres.enabled else "shapes",
      tokenizer="shapes",
      template="simple",
      workers=0,
      threads=0,
      prefetch=0,
      strict=False,
    )
  )  # any template fits shapes
  batches = pipeline.Batches(
    c,
    Tokenizer.load("shapes"),
    vlm.image_tokens(c.model),
    tile_groups=parallel.batch_divisor(mesh) * c.train.grad_accum,
  )
  try:
    batch = pipeline.device_batch(next(batches))
  finally:
    batches.close()
  sharding = parallel.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), batch)


@dataclasses.dataclass
class Memory:
  """A compiled program's memory per chip (XLA's memory analysis)."""

  arguments_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int

  @classmethod
  def of(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    return cls(
      int(m.argument_size_in_bytes), int(m.temp_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
    )

  @property
  def total_bytes(self) -> int:
    """Live at the peak: inputs, outputs not written over donated inputs, temporaries."""
    return self.arguments_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def _abstract(shapes, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _compile(program, *args):
  """(compiled, abstract outputs in their shardings)."""
  lowered = program.lower(*args)
  compiled = lowered.compile()
  return compiled, _abstract(lowered.out_info, compiled.output_shardings)


def compile_generation(run: build_lib.Run, rows: int, prompt_len: int, new_tokens: int) -> dict:
  """Compiles greedy generation's prefill and decode loop (infer/generate.py) for `rows` prompts
  of `prompt_len` tokens and `new_tokens` new ones, one image each: their per-chip memory, and
  the total with the params as loaded (decoding reads a per-layer copy of them besides)."""
  generator = generate.Generator(run.model, run.mesh, pad_id=0, context=run.config.model.llm.max_len)
  rows = -(-rows // generator.batch_multiple) * generator.batch_multiple
  unstack, prefill, decode = generator.programs(rows, prompt_len, new_tokens)
  unstacked, layer_params = _compile(unstack, _abstract(run.abstract_params, run.param_shardings))
  rep = parallel.replicated(run.mesh)
  value = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  v, slots = run.config.model.vision, generate.bucket(prompt_len)
  image_dtype = np.uint8 if run.config.data.images_uint8 else np.float32
  knobs = jax.tree.map(lambda x: value((), x.dtype), generate.Sampling().knobs())
  prefilled, state = _compile(
    prefill,
    layer_params,
    value((rows, slots), np.int32),
    value((rows,), np.int32),
    value((rows,), np.bool_),
    value((rows, 1, v.image_size, v.image_size, 3), image_dtype),
    value((rows,), np.uint32),
    knobs,
  )
  decoded, _ = _compile(decode, layer_params, state, value((), np.int32), knobs)
  stacked = Memory.of(unstacked).arguments_bytes
  prefill_memory, decode_memory = Memory.of(prefilled), Memory.of(decoded)
  return {
    "rows": rows,
    "prompt_tokens": prompt_len,
    "new_tokens": new_tokens,
    "stacked_params_bytes": stacked,
    "prefill": prefill_memory.to_json(),
    "decode": decode_memory.to_json(),
    "total_bytes": stacked + max(prefill_memory.total_bytes, decode_memory.total_bytes),
  }


def count_collectives(hlo_text: str) -> dict[str, int]:
  counts = dict.fromkeys(COLLECTIVES, 0)
  for match in _COLLECTIVE_OP.finditer(hlo_text):
    counts[match.group(1)] += 1
  return counts


def model_flops(config: ml_collections.ConfigDict, params, labels, batch: dict) -> float:
  """FLOPs of one step as the LLaVA reference baseline counts them: 2 per multiply-add of
  a weight and a token (or of the attention scores; causal: half) forward, 4 more backward for
  what trains (the LLM's backward for activations always, as its gradients reach the bridge)."""
  counts = {}
  for path, x in build_lib.flat_params(params).items():
    if path.startswith("llm/embedder"):  # a lookup, no FLOPs
      continue
    part = path.split("/")[0]
    counts[part] = counts.get(part, 0) + int(np.prod(x.shape))
  trains = {path.split("/")[0] for path, label in build_lib.flat_params(labels).items() if label != FROZEN}
  v, m = config.model.vision, config.model.llm
  images = batch["images"]  # [..., H, W, 3]: slots per row, a pool (data.image_pool) or AnyRes tiles
  if isinstance(images, dict):
    images = images.get("tiles", images.get("pool"))
  n_images = int(np.prod(images.shape[:-3]))
  per_image = (v.image_size // v.patch_size) ** 2 + int(v.keep_cls)
  rows, length = batch["tokens"].shape
  passes = lambda part, frozen_backward: 6 if part in trains else (4 if frozen_backward else 2)
  vision = (
    passes("vision", False) * (counts.get("vision", 0) * per_image + 2 * v.depth * v.width * per_image**2) * n_images
  )
  bridge = passes("bridge", "vision" in trains) * counts.get("bridge", 0) * n_images * vlm.image_tokens(config.model)
  attention_scores = m.depth * m.heads * m.head_dim * length * length  # multiply-adds of QK^T and PV, causal half
  llm = passes("llm", True) * (counts.get("llm", 0) * length + attention_scores) * rows
  # Cross-attention blocks (fusion): counted on every text token (their keys and values, on the
  # media tokens, are fewer); the LLM's backward reaches them.
  blocks = passes("bridge", True) * sum(n for part, n in counts.items() if part.startswith("xattn_")) * length * rows
  return float(vision + bridge + llm + blocks)


def compile_run(config: ml_collections.ConfigDict, topology: str, generation: tuple[int, int] | None = None) -> Report:
  """Builds the run for `topology`'s chips and AOT-compiles its train step, and with generation
  = (rows, new tokens) greedy generation for that many prompts of data.seq_len tokens."""
  chips = target(topology)
  devices = chips.devices
  mesh = parallel.make_mesh(config.mesh, devices)
  if config.model.llm.vocab_size == 0:
    build_lib.resolve_model_config(config, Tokenizer.load(config.data.tokenizer).vocab_size)
  trainer = trainer_lib.build(config, mesh, image_token_id=0)
  batch = abstract_batch(config, mesh)
  start = time.perf_counter()
  try:
    compiled = trainer.train_step.lower(_abstract(trainer.abstract_state, trainer.state_shardings), batch).compile()
    seconds = time.perf_counter() - start
    generated = None
    if generation:
      generated = compile_generation(trainer.run, generation[0], config.data.seq_len, generation[1])
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program over HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(topology, len(devices), dict(mesh.shape), str(e).strip().splitlines()[0]) from None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = model_flops(config, trainer.run.abstract_params, trainer.labels, batch) / len(devices)
  hlo = compiled.as_text()
  return Report(
    topology,
    len(devices),
    chips.device_kind,
    dict(mesh.shape),
    Memory.of(compiled),
    chips.hbm_bytes,
    flops,
    float(cost.get("flops", 0.0)),
    chips.peak_flops,
    count_collectives(hlo),
    hlo.count('custom_call_target="tpu_custom_call"'),
    seconds,
    generated,
  )


def levers_to_fit(config: ml_collections.ConfigDict, chips: int) -> list[str]:
  """Config changes that lower per-chip memory, among those this config does not use yet."""
  levers = []
  if config.model.remat != "full":
    levers.append("--config.model.remat=full")
  if config.mesh.fsdp not in (-1, chips):
    levers.append(f"--config.mesh.fsdp={chips} (params and optimizer state split over all {chips} chips)")
  levers.append(f"--config.train.grad_accum={2 * config.train.grad_accum} (half the activations per micro-batch)")
  if config.model.loss_chunk == 0:
    levers.append("--config.model.loss_chunk=256 (no [batch, seq, vocab] logits)")
  if config.stage != "full" and config.train.frozen_dtype == "float32":
    levers.append("--config.train.frozen_dtype=bfloat16 (frozen params in half the bytes)")
  if config.model.attention in ("xla", "cudnn"):
    levers.append("--config.model.attention=splash (no [heads, seq, seq] scores)")
  return levers


def describe(report: Report) -> str:
  gib = lambda n: f"{n / GIB:.2f} GiB"
  m = report.memory
  lines = [
    f"{report.topology}: {report.chips} x {report.device_kind}, mesh "
    + " x ".join(f"{k}={v}" for k, v in report.mesh.items())
    + f" (compiled in {report.compile_seconds:.0f} s)",
    f"train step, per chip: arguments {gib(m.arguments_bytes)}, temporaries {gib(m.temp_bytes)}, "
    f"outputs {gib(m.output_bytes)} ({gib(m.alias_bytes)} of them in donated inputs)",
    f"          total {gib(m.total_bytes)} of {gib(report.hbm_bytes)} HBM",
    f"FLOPs per step per chip: {report.flops_per_step:.3e} (model count; the compiler's, which counts a loop "
    f"body once: {report.compiler_flops:.3e})",
    f"roofline bound on the step time: "
    f"{report.roofline_seconds * 1e3:.1f} ms at {report.peak_flops / 1e12:.0f} TFLOP/s (not a measurement)",
    "collectives: "
    + ", ".join(f"{k} {v}" for k, v in report.collectives.items() if v)
    + f"; Pallas kernel calls: {report.pallas_kernels}",
  ]
  if report.generation:
    g = report.generation
    lines.append(
      f"generation ({g['rows']} prompts of {g['prompt_tokens']} tokens + {g['new_tokens']} new), per chip: "
      f"params {gib(g['stacked_params_bytes'])}, prefill {gib(g['prefill']['total_bytes'])}, "
      f"decode {gib(g['decode']['total_bytes'])}; total {gib(g['total_bytes'])}"
    )
  lines.append("fits" if report.fits else "DOES NOT FIT")
  return "\n".join(lines)
