"""Reading and writing the *.safetensors files of a Hugging Face model directory, as numpy.

Reading is lazy (memory-mapped, one tensor at a time), so a checkpoint larger than host memory
can be converted parameter by parameter. A directory in a bucket (gs://) is read in place, one
ranged read a tensor, so every host of a slice reads the one copy. Writing shards by size and
adds the index file that transformers expects for more than one shard.
"""

import contextlib
import json
import os
from typing import Callable, Iterable

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.files import as_path, is_remote

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safetensors():
  try:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs for BF16)
    import safetensors  # noqa: F401  (an optional dependency: the [convert] extra)
    import safetensors.numpy
  except ImportError:
    raise UserError(
      "reading Hugging Face checkpoints needs the safetensors package: pip install 'vlm-jax[convert]'"
    ) from None
  return safetensors


class _RangedFile:
  """A safetensors file in a bucket, with the interface of safetensors' safe_open handle:
  its header read once, each tensor by one ranged read (8-byte header size, JSON header, data)."""

  DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
  }

  def __init__(self, path):
    import ml_dtypes  # bfloat16 for numpy

    self._file = path.open("rb")
    size = int.from_bytes(self._file.read(8), "little")
    self._header = json.loads(self._file.read(size))
    self._header.pop("__metadata__", None)
    self._start = 8 + size
    self._numpy = {k: np.dtype(ml_dtypes.bfloat16 if v == "bfloat16" else v) for k, v in self.DTYPES.items()}

  def keys(self) -> list[str]:
    return list(self._header)

  def get_slice(self, key: str) -> "_RangedFile._Info":
    return self._Info(self._header[key])

  def get_tensor(self, key: str) -> np.ndarray:
    info = self._header[key]
    begin, end = info["data_offsets"]
    self._file.seek(self._start + begin)
    return np.frombuffer(self._file.read(end - begin), self._numpy[info["dtype"]]).reshape(info["shape"])

  def __enter__(self) -> "_RangedFile":
    return self

  def __exit__(self, *exc) -> None:
    self._file.close()

  class _Info:
    def __init__(self, info: dict):
      self._info = info

    def get_shape(self) -> list[int]:
      return self._info["shape"]

    def get_dtype(self) -> str:
      return self._info["dtype"]


class Reader:
  """Every tensor of a HF model directory (local or gs://): `model.safetensors`, an index, or any
  *.safetensors."""

  def __init__(self, directory: str):
    self.directory = directory
    self._files: dict[str, str] = {}  # key -> file name
    root = as_path(directory)
    index = root / INDEX
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{index}: not a safetensors index ({e})") from None
      names = sorted(set(weight_map.values()))
    else:
      names = sorted(f.name for f in root.iterdir() if f.name.endswith(".safetensors")) if root.is_dir() else []
      if not names:
        raise UserError(f"{directory}: no *.safetensors weights (only safetensors checkpoints are read)")
    st = _safetensors()
    self._stack = contextlib.ExitStack()
    self._handles = {}
    for name in names:
      path = root / name
      if not path.is_file():
        raise UserError(f"{index}: names {name}, which is missing")
      try:
        handle = self._stack.enter_context(
          _RangedFile(path) if is_remote(directory) else st.safe_open(os.fspath(path), framework="numpy")
        )
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


def write_sharded(
  directory: str, tensors: dict[str, Tensor], max_shard_bytes: int = 4 << 30, metadata: dict[str, str] | None = None
) -> list[str]:
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
