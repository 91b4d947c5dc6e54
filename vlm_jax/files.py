"""Files in and out: the JSON files users and checkpoints bring (one-line errors naming the file),
and the path layer workdirs, Hugging Face directories and tokenizers go through (etils.epath:
local or gs://)."""

import hashlib
import json
import os
import tempfile
import time

from etils import epath

from vlm_jax.errors import UserError


def read_json(directory: str, name: str = "config.json", required: bool = True) -> dict | None:
  """DIRECTORY/NAME parsed (local or gs://); None when it is absent and not required."""
  path = as_path(directory) / name
  if not path.is_file():
    if required:
      raise UserError(f"{directory}: no {name} (not a Hugging Face model directory?)")
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None


def is_remote(path: str) -> bool:
  return "://" in str(path)


def local_files(path: str) -> str:
  """A local path for the small files of a directory (or one file) in a bucket: everything but
  the *.safetensors weights (read in place, convert/safetensors_io.py), copied into a cache that
  is refreshed on each call. Local paths are returned as they are."""
  if not is_remote(path):
    return path
  src = as_path(path)
  if not src.exists():
    raise UserError(f"{path}: no such file or directory")
  cache = os.path.join(
    os.environ.get("VLM_JAX_CACHE", os.path.join(tempfile.gettempdir(), "vlm_jax")),
    hashlib.sha256(str(path).encode()).hexdigest()[:16],
  )
  os.makedirs(cache, exist_ok=True)
  files = [f for f in src.iterdir() if f.is_file() and not f.name.endswith(".safetensors")] if src.is_dir() else [src]
  for f in files:
    tmp = os.path.join(cache, f".{f.name}.{os.getpid()}")
    with open(tmp, "wb") as out:
      out.write(f.read_bytes())
    os.replace(tmp, os.path.join(cache, f.name))  # atomic: processes of one host may share the cache
  return cache if src.is_dir() else os.path.join(cache, src.name)


def check_empty_dir(path: str, flag: str) -> None:
  """An output directory must be new or empty: nothing a user wrote is overwritten."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise UserError(f"{flag} {path} exists and is not an empty directory")


def as_path(path: str) -> epath.Path:
  """A workdir path through one layer for every filesystem: local (made absolute) or a URI
  etils.epath opens (gs://bucket/run on a TPU VM)."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def check_output_dir(path: str, flag: str, subdirs: tuple[str, ...] = (), files: tuple[str, ...] = ()) -> None:
  """A directory a command will write into (made if absent) can be: one line naming the path
  in the way (a file where a directory belongs, or the reverse) or the one not writable."""
  root = as_path(path)
  for name in subdirs:
    if (root / name).exists() and not (root / name).is_dir():
      raise UserError(f"{flag} {root}: {root / name} is a file where a directory belongs")
  for name in files:
    if (root / name).is_dir():
      raise UserError(f"{flag} {root}: {root / name} is a directory where a file belongs")
  existing = root  # the workdir itself, or its nearest ancestor that exists
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"{flag} {root}: {existing} is a file, not a directory")
  probe = existing / f".vlm-jax-write-test-{os.getpid()}"
  try:
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"{flag} {root}: cannot write in {existing} ({e.strerror or e})") from None


class AppendFile:
  """A file appended to (metrics, TensorBoard events). Object stores cannot append: there the
  whole file is uploaded again on a flush at most every `upload_every` seconds, and on close."""

  def __init__(self, path: epath.Path, upload_every: float = 30.0):
    self.path = path
    self._local = path.as_posix().startswith("/")
    if self._local:
      self._file = open(path, "ab")
    else:
      self._data = bytearray(path.read_bytes() if path.exists() else b"")
      self._upload_every, self._uploaded = upload_every, 0.0

  def write(self, data: bytes) -> None:
    if self._local:
      self._file.write(data)
    else:
      self._data += data

  def flush(self, force: bool = False) -> None:
    if self._local:
      self._file.flush()
    elif force or time.monotonic() - self._uploaded >= self._upload_every:
      self.path.write_bytes(bytes(self._data))
      self._uploaded = time.monotonic()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self.flush(force=True)
