"""Reading and writing the *.safetensors files of a Hugging Face model directory, as numpy.

Reading is lazy (memory-mapped, one tensor at a time), so a checkpoint larger than host memory
can be converted parameter by parameter. Writing shards by size and adds the index file that
transformers expects for more than one shard.
"""

import contextlib
import json
import os
from typing import Callable, Iterable

import numpy as np

from vlm_jax.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safetensors():
  try:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs for BF16)
    import safetensors  # noqa: F401  (an optional dependency: the [convert] extra)
    import safetensors.numpy
  except ImportError:
    raise UserError("reading Hugging Face checkpoints needs the safetensors package: "
                    "pip install 'vlm-jax[convert]'") from None
  return safetensors


class Reader:
  """Every tensor of a HF model directory: `model.safetensors`, an index, or any *.safetensors."""

  def __init__(self, directory: str):
    self.directory = directory
    self._files: dict[str, str] = {}   # key -> file name
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{index}: not a safetensors index ({e})") from None
      names = sorted(set(weight_map.values()))
    else:
      names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      if not names:
        raise UserError(f"{directory}: no *.safetensors weights (only safetensors checkpoints are read)")
    st = _safetensors()
    self._stack = contextlib.ExitStack()
    self._handles = {}
    for name in names:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise UserError(f"{index}: names {name}, which is missing")
      try:
        handle = self._stack.enter_context(st.safe_open(path, framework="numpy"))
      except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
      self._handles[name] = handle
      for key in handle.keys():
        self._files[key] = name

  def keys(self) -> list[str]:
    return list(self._files)

  def __contains__(self, key: str) -> bool:
    return key in self._files

  def file_of(self, key: str) -> str:
    return self._files[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self._files[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """safetensors dtype name: F32, BF16, F16, ..."""
    return self._handles[self._files[key]].get_slice(key).get_dtype()

  def get(self, key: str) -> np.ndarray:
    return self._handles[self._files[key]].get_tensor(key)

  def close(self) -> None:
    self._stack.close()

  def __enter__(self) -> "Reader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


Tensor = tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]  # shape, dtype, producer


def write_sharded(directory: str, tensors: dict[str, Tensor], max_shard_bytes: int = 4 << 30,
                  metadata: dict[str, str] | None = None) -> list[str]:
  """Writes tensors (produced one shard at a time) as model.safetensors or model-0000k-of-0000n
  shards plus an index. Returns the file names."""
  st = _safetensors()
  shards, size = [[]], 0
  for key, (shape, dtype, _) in tensors.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  n = len(shards)
  names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  os.makedirs(directory, exist_ok=True)
  weight_map, total = {}, 0
  for name, keys in zip(names, shards):
    arrays = {}
    for key in keys:
      shape, dtype, produce = tensors[key]
      array = np.require(produce(), dtype=dtype, requirements="C")  # (ascontiguousarray makes a scalar 1-D)
      if array.shape != tuple(shape):
        raise ValueError(f"{key}: produced shape {array.shape}, announced {tuple(shape)}")
      arrays[key] = array
      weight_map[key] = name
      total += array.nbytes
    st.numpy.save_file(arrays, os.path.join(directory, name), metadata={"format": "pt", **(metadata or {})})
    del arrays
  if n > 1:
    with open(os.path.join(directory, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def read_all(directory: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """Every (or the given) tensor of a directory, loaded: for tests and small files."""
  with Reader(directory) as r:
    return {k: r.get(k) for k in (r.keys() if keys is None else keys)}
