"""HF tensors <-> our params tree, driven by the key tables.

Import checks every key and shape first (one clear error before any loading), then builds one
parameter at a time on the host (stacking its layers) and places it straight into its target
sharding: host memory holds one parameter, never the model. Export produces HF tensors lazily,
one file shard at a time.
"""

import dataclasses
import logging

import jax
import ml_collections
import numpy as np

from vlm_jax.convert import tables
from vlm_jax.convert.layout import Layout
from vlm_jax.convert.safetensors_io import Reader, Tensor
from vlm_jax.errors import UserError

log = logging.getLogger("vlm_jax")

# Our vocab axis of the params that grow when a tokenizer gains <image> (stage-1 assembly, a
# contrastive model's text tower).
VOCAB_AXIS = {"llm/embedder/embedding": 0, "llm/lm_head": 1, "text/embed/embedding": 0}


@dataclasses.dataclass(frozen=True)
class Item:
  """One of our params and the HF tensors it is made of (one per layer when stacked)."""

  path: str
  keys: tuple[str, ...]
  transform: tables.Transform
  shape: tuple[int, ...]  # ours, full (leading layers axis when stacked)
  stacked: bool

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape


def plan(
  model_cfg: ml_collections.ConfigDict, layout: Layout, shapes: dict[str, tuple[int, ...]], components: tuple[str, ...]
) -> list[Item]:
  """Items for every param of the given components; shapes: {our path: shape}."""
  items = []
  for comp, entries in tables.entries(model_cfg, components).items():
    for e in entries:
      path = f"{comp}/{e.ours}" if e.ours else comp
      if path not in shapes:
        raise KeyError(f"table entry {path} is not a param of the model")  # a table bug, not user input
      prefix = layout[e.slot or comp]
      shape = tuple(shapes[path])
      keys = tuple(prefix + e.hf.format(i=i) for i in range(shape[0])) if e.per_layer else (prefix + e.hf,)
      items.append(Item(path, keys, e.transform, shape, e.per_layer))
  covered = {it.path for it in items}
  for path in shapes:
    if path.split("/", 1)[0] in components and path not in covered:
      raise UserError(
        f"param {path} has no Hugging Face counterpart (config.model: bridge kind "
        f"{model_cfg.bridge.kind!r}, vision flavour {model_cfg.vision.flavour!r})"
      )
  return items


def _expected_hf_shape(item: Item, grow_vocab: bool, got: tuple[int, ...]) -> tuple[int, ...]:
  expected = item.transform.hf_shape(item.layer_shape)
  if grow_vocab and item.path in VOCAB_AXIS:
    hf_axis = 0  # both embed_tokens and lm_head have vocab first in HF
    if len(got) == len(expected) and got[hf_axis] <= expected[hf_axis]:
      expected = expected[:hf_axis] + (got[hf_axis],) + expected[hf_axis + 1 :]
  return expected


def check(reader: Reader, items: list[Item], where: str, grow_vocab: bool = False) -> None:
  """Every key present with the shape the config implies, else a UserError naming it."""
  for it in items:
    for key in it.keys:
      if key not in reader:
        raise UserError(f"{where}: missing tensor {key} (for our {it.path})")
      got = reader.shape(key)
      expected = _expected_hf_shape(it, grow_vocab, got)
      if got != expected:
        raise UserError(
          f"{where}/{reader.file_of(key)}: tensor {key} has shape {list(got)}, but config.json implies {list(expected)}"
        )


def _host(reader: Reader, it: Item) -> np.ndarray:
  """Our param as fp32 host memory; vocab rows beyond the file's are the mean of the others
  (new tokens start as an average token, as transformers' resize_token_embeddings does)."""
  out = np.empty(it.shape, np.float32)
  for layer, key in enumerate(it.keys):
    x = reader.get(key).astype(np.float32)
    target = out[layer] if it.stacked else out
    if it.path in VOCAB_AXIS and x.shape[0] < (target.shape[VOCAB_AXIS[it.path]]):
      axis = VOCAB_AXIS[it.path]
      n = x.shape[0]
      part = it.transform.to_ours(x, tuple(n if a == axis else d for a, d in enumerate(target.shape)))
      index = [slice(None)] * target.ndim
      index[axis] = slice(0, n)
      target[tuple(index)] = part
      index[axis] = slice(n, None)
      target[tuple(index)] = part.mean(axis=axis, keepdims=True)
    else:
      target[...] = it.transform.to_ours(x, target.shape)
  return out


def read(reader: Reader, items: list[Item], shardings: dict | None = None) -> dict[str, object]:
  """{our path: array}: jax arrays in `shardings[path]` if given, else numpy (fp32)."""
  out = {}
  for it in sorted(items, key=lambda it: (reader.file_of(it.keys[0]), it.keys[0])):  # file order
    host = _host(reader, it)
    if shardings is None:
      out[it.path] = host
    else:
      out[it.path] = jax.make_array_from_callback(host.shape, shardings[it.path], lambda idx, h=host: h[idx])
    del host
  return out


def consumed(items: list[Item]) -> set[str]:
  return {k for it in items for k in it.keys}


def hf_tensors(items: list[Item], params: dict[str, object], dtype_of) -> dict[str, Tensor]:
  """{HF key: (shape, dtype, producer)}; dtype_of(key) -> numpy dtype of the written tensor."""
  out = {}
  for it in items:
    hf_shape = it.transform.hf_shape(it.layer_shape)
    for layer, key in enumerate(it.keys):

      def produce(it=it, layer=layer):
        x = params[it.path][layer] if it.stacked else params[it.path]
        return it.transform.to_hf(np.asarray(x, np.float32))

      out[key] = (hf_shape, dtype_of(key), produce)
  return out


def unflatten(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree
