"""Tiny configs, synthetic batches and tree helpers for the trainer tests."""

import importlib
import pathlib

import jax
import ml_collections
import numpy as np

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax.models.vlm import image_tokens


def tiny_config(overrides: dict[str, object] | None = None) -> ml_collections.ConfigDict:
  """A model small enough to compile in seconds on CPU, fp32 so equivalences can be tight.

  `overrides` go through config.apply_overrides as `--config.KEY=VALUE` would.
  """
  c = config_lib.base()
  c.model.dtype = "float32"
  c.model.vision.update(dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64))
  c.model.llm.update(dict(width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64))
  c.data.seq_len = 32
  c.train.batch_size = 8
  c.train.steps = 10
  c.train.warmup_steps = 0  # lr > 0 from the first step, so one step moves every trained param
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  config_lib.apply_overrides(c, {k: str(v) for k, v in (overrides or {}).items()})
  build_lib.validate(c)
  return c


def data_config(spec: str, *, seq_len: int, batch: int, seed: int, **data) -> ml_collections.ConfigDict:
  """The base config reading `spec` with these data fields, as pipeline.Batches takes it."""
  c = config_lib.base()
  c.seed, c.train.batch_size = seed, batch
  c.data.update(dict(sources=spec, seq_len=seq_len, **data))
  return c


def random_batch(seed: int, cfg: ml_collections.ConfigDict, image_id: int) -> dict[str, np.ndarray]:
  """A batch with pipeline.collate's layout and varied content: rows of different lengths,
  text-only rows, packed rows (two segments), and a different number of supervised targets
  per row (so a mean of per-micro-batch means differs from the token mean)."""
  rng = np.random.default_rng(seed)
  b, length = cfg.train.batch_size, cfg.data.seq_len
  n_image, size, vocab = image_tokens(cfg.model), cfg.model.vision.image_size, cfg.model.llm.vocab_size
  out = {
    "tokens": np.zeros((b, length), np.int32),
    "targets": np.zeros((b, length), np.int32),
    "loss_mask": np.zeros((b, length), np.float32),
    "segment_ids": np.zeros((b, length), np.int32),
    "positions": np.zeros((b, length), np.int32),
    "images": np.zeros((b, 1, size, size, 3), np.float32),
    "image_mask": np.zeros((b, 1), np.float32),
  }
  for r in range(b):
    has_image = r % 4 != 3
    n_segments = 2 if r % 4 == 2 else 1
    total = int(rng.integers(length // 2 + n_image, length + 1))
    bounds = [0, total] if n_segments == 1 else [0, total // 2, total]
    density = rng.uniform(0.1, 0.9)
    for s in range(n_segments):
      lo, hi = bounds[s], bounds[s + 1]
      seg = rng.integers(0, vocab, hi - lo).astype(np.int32)
      seg[seg == image_id] = (image_id + 1) % vocab
      if has_image and s == 0:
        start = int(rng.integers(1, hi - lo - n_image))
        seg[start : start + n_image] = image_id
      out["tokens"][r, lo:hi] = seg
      out["segment_ids"][r, lo:hi] = s + 1
      out["positions"][r, lo:hi] = np.arange(hi - lo)
      out["targets"][r, lo : hi - 1] = seg[1:]
      supervised = (rng.random(hi - lo - 1) < density) & (seg[1:] != image_id) & (seg[:-1] != image_id)
      supervised[-1] = True  # every segment has at least one supervised target
      out["loss_mask"][r, lo : hi - 1] = supervised
    if has_image:
      out["images"][r, 0] = rng.normal(size=(size, size, 3))
      out["image_mask"][r, 0] = 1
  return out


def to_host(tree):
  """Copies (never views) of every array: safe to keep across steps that donate their inputs."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def moment_paths(opt_state, with_none: bool = False) -> list:
  """Param paths of every param-shaped optimizer-state leaf (Adam mu, nu, ...): the trailing
  dict keys of the leaf's path in the optimizer-state tree. with_none: one entry per leaf, None
  for leaves that mirror no param (step counts)."""
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(str(k.key))
    if keys:
      paths.append("/".join(reversed(keys)))
    elif with_none:
      paths.append(None)
  return paths


def per_sample_loss(model, params, batch) -> dict[str, float]:
  """Mean loss of each sample (by key) in a batch with pipeline keys, packed or not."""
  logits = model.apply({"params": params}, batch["tokens"], batch["images"], batch["positions"], batch["segment_ids"])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], axis=-1)[..., 0]
  out = {}
  for r, row in enumerate(batch["keys"]):
    for s, key in enumerate(row, start=1):
      mask = (batch["segment_ids"][r] == s) * batch["loss_mask"][r]
      out[key] = float((nll[r] * mask).sum() / mask.sum())
  return out


def workdir_files(workdir) -> dict[str, bytes]:
  """{relative path: bytes} of every file under `workdir`: what a failed start must leave as it was."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(pathlib.Path(workdir).rglob("*")) if p.is_file()}


def fake_gcs(monkeypatch) -> None:
  """gs:// through etils.epath onto fsspec's in-memory filesystem, standing in for GCS (no network
  here), for the test that calls it."""
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs' option
      super().__init__(*args, **kwargs)

  registry = importlib.import_module("fsspec.registry")._registry
  for name in FakeGCS.protocol:
    monkeypatch.setitem(registry, name, FakeGCS)
