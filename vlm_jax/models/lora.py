"""LoRA and QLoRA (config.lora) through qwix: low-rank adapters on the Dense layers whose module
path a target regex matches, the base weights frozen and, for QLoRA, stored quantized.

qwix intercepts the matched modules' dot_generals. Each adapted `kernel` [*in, *out] (a leading
"layers" axis when stacked) gains `kernel_lora_a` [in, rank] and `kernel_lora_b` [rank, out]
(in and out flattened), the output gains (alpha / rank) * dropout(x) @ a @ b, as in PEFT;
b starts at zero, so an untrained adapter leaves the model exactly as it was. The adapters take
their kernel's logical axes (a: its input axis, b: its first output axis), so they shard like
the weight they adapt. With base_dtype int8 or nf4 the kernel is a qwix `WithAux(QArray)`
(codes + scales), quantized per layer.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import qwix
from qwix._src.core import qarray  # quantize / dequantize one array: not re-exported by qwix
from qwix._src.providers import ptq

from vlm_jax.errors import UserError
from vlm_jax.models.layers import Dense


QUANTIZED = ("int8", "nf4")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# The model's methods that run the adapted layers (qwix intercepts calls made under these).
METHODS = ("__call__", "loss", "prefill", "extend", "encode_images")


def enabled(lora_cfg: ml_collections.ConfigDict) -> bool:
  return lora_cfg.rank > 0


def targets(lora_cfg: ml_collections.ConfigDict) -> list[str]:
  patterns = [p.strip() for p in lora_cfg.targets.split(",") if p.strip()]
  if not patterns:
    raise UserError("config.lora.targets: no pattern given (e.g. 'llm/.*/(q|k|v|o)')")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise UserError(f"config.lora.targets: bad regex {p!r}: {e}") from None
  return patterns


def _with_blocks(pattern: str) -> str:
  # Decoding runs the LLM's layers as "block_<i>" modules (VLM.layer_list): a target written
  # against the training layout ("llm/layers/q") matches them too.
  return f"(?:{pattern})|(?:{pattern.replace('layers', r'block_[0-9]+')})"


def quantization_blocks(model: nn.Module, inputs: tuple, lora_cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """QLoRA's block (input rows per scale) for each adapted kernel: the largest power of two up to
  lora.block_size that divides the kernel's last input axis (what qwix tiles). {module path: block}."""
  sizes = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Dense) and context.method_name == "__call__":
      sizes["/".join(context.module.path)] = args[0].shape[-1]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), *inputs)
  patterns = targets(lora_cfg)
  blocks = {}
  for path, size in sorted(sizes.items()):
    if any(re.fullmatch(p, path) for p in patterns):
      block = 1 << (lora_cfg.block_size.bit_length() - 1)
      while size % block:
        block //= 2
      blocks[path] = block
  return blocks


def wrap(
  model: nn.Module, lora_cfg: ml_collections.ConfigDict, train: bool = False, blocks: dict[str, int] | None = None
) -> nn.Module:
  """The model with adapters on the target modules (module paths like "llm/layers/q"); dropout
  on their input only with train (it then needs a "dropout" rng). QLoRA (base_dtype int8 / nf4)
  quantizes each kernel in `blocks[path]` input rows per scale (quantization_blocks), one scale
  per output channel without a lora.block_size."""
  qtype = lora_cfg.base_dtype if lora_cfg.base_dtype in QUANTIZED else None
  rule = lambda pattern, tile=None: qwix.LoraRule(
    module_path=_with_blocks(pattern),
    rank=lora_cfg.rank,
    alpha=float(lora_cfg.alpha),
    dropout=lora_cfg.dropout if train else 0.0,
    weight_qtype=qtype,
    tile_size=tile,
  )
  if qtype and lora_cfg.block_size:
    by_block = {}
    for path, block in (blocks or {}).items():
      by_block.setdefault(block, []).append(re.escape(path))
    rules = [rule("|".join(paths), block) for block, paths in sorted(by_block.items())]
  else:
    rules = [rule(p) for p in targets(lora_cfg)]
  return qwix.apply_lora_to_model(model, qwix.LoraProvider(rules), methods=METHODS)


def fp32_masters(params):
  """qwix creates a quantized kernel's adapters in the dtype the kernel is read in (the compute
  dtype): as every param the optimizer updates, they are kept in fp32. Boxed or plain trees."""

  def cast(path, x):
    adapter = any(str(getattr(k, "key", "")).endswith(ADAPTER_SUFFIXES) for k in path)
    return x.astype(jnp.float32) if adapter else x

  return jax.tree_util.tree_map_with_path(cast, params)


def is_adapter(path: str) -> bool:
  """path: a param path ("llm/layers/q/kernel_lora_a")."""
  return path.endswith(ADAPTER_SUFFIXES)


def is_quantized(x) -> bool:
  return isinstance(x, ptq.WithAux)


def check_targets(lora_cfg: ml_collections.ConfigDict, paths: list[str]) -> None:
  """Every target pattern adapts some module; paths: the LoRA model's param paths."""
  adapted = sorted({p.rsplit("/", 1)[0] for p in paths if is_adapter(p)})
  for pattern in targets(lora_cfg):
    if not any(re.fullmatch(pattern, m) for m in adapted):
      raise UserError(
        f"config.lora.targets: pattern {pattern!r} matches no Dense module "
        f"(module paths look like llm/layers/q, llm/layers/up, vision/layers/fc1, bridge/linear_1)"
      )


def _stacked(path: tuple[str, ...]) -> bool:
  """Params under a scanned "layers" module carry a leading layer axis (layers.LayerStack)."""
  return "layers" in path


def _per_layer(fn, path: tuple[str, ...]):
  return jax.vmap(fn) if _stacked(path) else fn


def _walk(tree: dict, fn, path: tuple[str, ...] = ()) -> dict:
  """Maps fn(path, module_params) over every dict of params that holds a "kernel"."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out[key] = _walk(value, fn, path + (key,))
    else:
      out[key] = value
  return fn(path, out) if "kernel" in out else out


def attach(base: dict, fresh: dict) -> dict:
  """The LoRA model's params from a plain model's (a checkpoint, a Hugging Face import) and a
  fresh LoRA init: the fresh adapters, every other param from base, the adapted kernels
  quantized where base_dtype says so."""

  def go(b: dict, f: dict, path: tuple[str, ...]) -> dict:
    if "kernel_lora_a" not in f:
      return {k: go(b[k], v, path + (k,)) if isinstance(v, dict) else b[k] for k, v in f.items()}
    out = dict(b, kernel_lora_a=f["kernel_lora_a"], kernel_lora_b=f["kernel_lora_b"])
    if is_quantized(f["kernel"]):
      # As the model quantizes a kernel: read in the compute dtype, which its scales keep.
      how, dtype = f["kernel"].how, f["kernel"].array.scale.dtype
      out["kernel"] = f["kernel"].replace(
        array=_per_layer(lambda w: qarray.quantize(w.astype(dtype), how), path)(b["kernel"])
      )
    return out

  return go(base, fresh, ())


def store_base(params: dict, lora_cfg: ml_collections.ConfigDict) -> dict:
  """base_dtype bfloat16: adapted kernels kept in bf16 (frozen: no optimizer update is lost to
  rounding); float32 and the quantized kinds as they are. The train state's storage."""
  if lora_cfg.base_dtype != "bfloat16":
    return params

  def module(path, p):
    if "kernel_lora_a" in p:
      return dict(p, kernel=p["kernel"].astype(jnp.bfloat16))
    return p

  return _walk(params, module)


def _delta(p: dict, kernel_shape: tuple[int, ...], scale: float) -> jax.Array:
  a, b = p["kernel_lora_a"].astype(jnp.float32), p["kernel_lora_b"].astype(jnp.float32)
  return (scale * jnp.einsum("...ir,...ro->...io", a, b)).reshape(kernel_shape)


def base_weight(path: tuple[str, ...], kernel) -> jax.Array:
  """An adapted kernel as fp32 (dequantized when stored quantized)."""
  if is_quantized(kernel):
    return _per_layer(lambda q: qarray.dequantize(q).astype(jnp.float32), path)(kernel.array)
  return kernel.astype(jnp.float32)


def merge(params: dict, lora_cfg: ml_collections.ConfigDict, with_adapters: bool = True) -> dict:
  """The plain model's params: kernel + (alpha / rank) a @ b for every adapted kernel (base
  weights only with with_adapters=False); the adapters dropped."""
  scale = lora_cfg.alpha / lora_cfg.rank

  def module(path, p):
    if "kernel_lora_a" not in p:
      return p
    kernel = base_weight(path, p["kernel"])
    if with_adapters:
      kernel = kernel + _delta(p, kernel.shape, scale)
    return {**{k: v for k, v in p.items() if not k.endswith(ADAPTER_SUFFIXES)}, "kernel": kernel}

  return _walk(params, module)


def adapters(params: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{module path ("llm/layers/q"): (a, b)} of every adapted kernel."""
  out = {}

  def module(path, p):
    if "kernel_lora_a" in p:
      out["/".join(path)] = (p["kernel_lora_a"], p["kernel_lora_b"])
    return p

  _walk(params, module)
  return out
