"""Rows of a batch from prepared samples: first-fit packing, collation, exact resume.

With packing, each sample goes into the first row with room for its tokens and images; the
batch is complete when a sample fits no row (that sample opens the next batch). Without it,
each row holds one sample. With AnyRes the rows also form tile groups (TileGroups)
and a sample goes only where its group's pool has room for its tiles: a row that does not fit
moves to the next group, or the sample opens the next batch; nothing is dropped. Either way a
batch has fixed shapes, and its cost does not depend on the samples' lengths, so filling rows
is what length-aware batching means here. Square images with data.image_pool form groups the
same way (ImagePool), one image a tile.
"""

import dataclasses
import sys
from typing import Any, Sequence

import grain
import numpy as np

from vlm_jax.data.anyres_batch import AnyRes, Tiled
from vlm_jax.data.prepare import Prepared, Skipped
from vlm_jax.errors import UserError

# A run of this many skipped samples means the data cannot fit the config (e.g. seq_len too
# small for every sample); stop instead of looping forever.
MAX_SKIPPED_IN_A_ROW = 1000


class Skips:
  """The samples a batcher rejected since its previous batch: {reason: count}, the first message
  per reason, and the run of rejections in a row (MAX_SKIPPED_IN_A_ROW ends it)."""

  def __init__(self):
    self.counts: dict[str, int] = {}
    self.messages: dict[str, str] = {}
    self._in_a_row = 0

  def take(self, element) -> bool:
    """Whether the element is a Skipped (counted); a kept one ends the run."""
    if not isinstance(element, Skipped):
      self._in_a_row = 0
      return False
    self.counts[element.reason] = self.counts.get(element.reason, 0) + 1
    self.messages.setdefault(element.reason, element.message)
    self._in_a_row += 1
    if self._in_a_row >= MAX_SKIPPED_IN_A_ROW:
      raise UserError(f"{self._in_a_row} samples in a row skipped (last: {element.message}; reasons {self.counts})")
    return True

  def batch_fields(self) -> dict[str, Any]:
    return {"skipped": self.counts, "skip_messages": self.messages}


class CountingIterator(grain.DatasetIterator):
  """A batcher that counts the stream elements it reads, in its own state beside its parent's, so
  that each batch says where in this process's stream the next batch starts (`stream_position`):
  where a run continues on another process count (pipeline.Batches.continue_from)."""

  def __init__(self, parent: grain.DatasetIterator, start: int):
    super().__init__(parent)
    self._read: int | None = start  # None: restored from a state that did not keep it

  def _read_one(self):
    element = next(self._parent)
    if self._read is not None:
      self._read += 1
    return element

  def _next_start(self) -> int | None:
    return self._read

  def _state(self, parent_state: dict[str, Any]) -> dict[str, Any]:
    return {"parent": parent_state, "position": self._next_start()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._read = state.get("position")


def collate_text(rows: Sequence[Sequence[Prepared]], seq_len: int, pad_id: int) -> dict[str, Any]:
  """tokens/targets/loss_mask/segment_ids/positions [b, seq_len]: sample j of a row is segment
  j + 1 (0 = padding) with positions restarting at 0; targets[i] = tokens[i + 1] within a
  sample and loss_mask[i] says whether that target is supervised (never across samples).
  keys: per row, the ids of its samples (host-only, not for the device).
  """
  b = len(rows)
  tokens = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((b, seq_len), np.float32)
  segment_ids = np.zeros((b, seq_len), np.int32)
  positions = np.zeros((b, seq_len), np.int32)
  for r, row in enumerate(rows):
    start = 0
    for j, sample in enumerate(row):
      n, end = len(sample.tokens), start + len(sample.tokens)
      if end > seq_len:
        raise ValueError(f"row {r}: samples need {end} tokens, more than {seq_len}")
      tokens[r, start:end] = sample.tokens
      targets[r, start : end - 1] = sample.tokens[1:]
      loss_mask[r, start : end - 1] = sample.loss_mask[1:]
      segment_ids[r, start:end] = j + 1
      positions[r, start:end] = np.arange(n)
      start = end
  return {
    "tokens": tokens,
    "targets": targets,
    "loss_mask": loss_mask,
    "segment_ids": segment_ids,
    "positions": positions,
    "keys": [[s.key for s in row] for row in rows],
  }


@dataclasses.dataclass(frozen=True)
class TileGroups:
  """The local batch's rows in `groups` contiguous groups, each with a pool of `tiles_per_group`
  tile slots; PackBatches places a sample only in a row whose group has room for its tiles."""

  anyres: AnyRes
  groups: int
  tiles_per_group: int
  visual_len: int

  def collate(self, rows: Sequence[Sequence[Prepared]]) -> dict[str, dict[str, np.ndarray]]:
    return {
      "images": self.anyres.collate(
        [[im for s in row for im in _tiled(s)] for row in rows],
        groups=self.groups,
        tiles_per_group=self.tiles_per_group,
        visual_len=self.visual_len,
      )
    }


@dataclasses.dataclass(frozen=True)
class ImagePool:
  """Square images pooled (data.image_pool): the local batch's rows in `groups` contiguous groups,
  each with `tiles_per_group` image slots that only real images take, so empty row slots cost no
  ViT work. VLM.encode_pool reads {"pool" [G, P, H, W, 3], "index" [B, V]}: visual token v of a
  row is feature index[v] of its group's pool features [P * image_tokens] (V: max_images *
  image_tokens; entries past a row's images are never read)."""

  groups: int
  tiles_per_group: int
  image_shape: tuple[int, int]
  image_dtype: type
  image_tokens: int
  visual_len: int

  def collate(self, rows: Sequence[Sequence[Prepared]]) -> dict[str, dict[str, np.ndarray]]:
    if len(rows) % self.groups:
      raise ValueError(f"{len(rows)} rows do not split into {self.groups} groups")
    rows_per_group, n = len(rows) // self.groups, self.image_tokens
    pool = np.zeros((self.groups, self.tiles_per_group, *self.image_shape, 3), self.image_dtype)
    index = np.zeros((len(rows), self.visual_len), np.int32)
    used = [0] * self.groups
    for r, row in enumerate(rows):
      g, v = r // rows_per_group, 0
      for sample in row:
        k = len(sample.images)
        if used[g] + k > self.tiles_per_group:
          raise ValueError(f"group {g}: {used[g] + k} images > {self.tiles_per_group} slots")
        pool[g, used[g] : used[g] + k] = sample.images
        index[r, v : v + k * n] = np.arange(used[g] * n, (used[g] + k) * n)
        used[g] += k
        v += k * n
    return {"images": {"pool": pool, "index": index}}


def _tiled(sample: Prepared) -> list[Tiled]:
  """A prepared sample's images: its tiles split by plan."""
  starts = np.cumsum([0] + [p.tiles for p in sample.plans])
  return [Tiled(p, sample.images[a:b]) for p, a, b in zip(sample.plans, starts, starts[1:])]


def square_images(
  rows: Sequence[Sequence[Prepared]], max_images: int, image_shape: tuple[int, int], image_dtype: type = np.float32
) -> dict[str, np.ndarray]:
  """images [b, max_images, H, W, 3] in the order of the row's placeholders (uint8 pixels or
  float32 normalised: Preprocessing.dtype), image_mask [b, max_images]."""
  images = np.zeros((len(rows), max_images, *image_shape, 3), image_dtype)
  image_mask = np.zeros((len(rows), max_images), np.float32)
  for r, row in enumerate(rows):
    n_images = 0
    for sample in row:
      if n_images + len(sample.images) > max_images:
        raise ValueError(f"row {r}: samples need {n_images + len(sample.images)} images, more than {max_images}")
      images[r, n_images : n_images + len(sample.images)] = sample.images
      image_mask[r, n_images : n_images + len(sample.images)] = 1
      n_images += len(sample.images)
  return {"images": images, "image_mask": image_mask}


class PackBatches(grain.IterDataset):
  """Prepared | Skipped elements -> batches with `skipped` {reason: count} and `skip_messages`
  {reason: first message} of the samples rejected since the previous batch."""

  def __init__(
    self,
    parent: grain.IterDataset,
    *,
    rows: int,
    seq_len: int,
    max_images: int,
    image_shape: tuple[int, int],
    pad_id: int,
    pack: bool,
    tile_groups: "TileGroups | ImagePool | None" = None,
    image_dtype: type = np.float32,
    start: int = 0,
  ):
    super().__init__(parent)
    self.start = start  # the parent's first element's position in this process's stream
    self.rows, self.seq_len, self.max_images = rows, seq_len, max_images
    self.image_shape, self.image_dtype, self.pad_id, self.pack = image_shape, image_dtype, pad_id, pack
    self.tile_groups = tile_groups  # AnyRes, data.image_pool: rows in groups, each with a pool of tile slots

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(CountingIterator):
  """State = the parent's state before the sample that opens the next batch, so a restored
  iterator reads that sample again and makes exactly the batches an unbroken one makes."""

  def __init__(self, parent: grain.DatasetIterator, spec: PackBatches):
    super().__init__(parent, spec.start)
    self._spec = spec
    self._pending: tuple[Prepared, dict] | None = None

  def _next_element(self) -> tuple[Prepared | Skipped, dict]:
    if self._pending is not None:
      element, self._pending = self._pending, None
      return element
    state = self._parent.get_state()
    return self._read_one(), state

  def __next__(self) -> dict[str, Any]:
    s = self._spec
    rows: list[list[Prepared]] = [[] for _ in range(s.rows)]
    room = [[s.seq_len, s.max_images] for _ in range(s.rows)]
    groups = s.tile_groups.groups if s.tile_groups else 1
    tiles_left = [s.tile_groups.tiles_per_group if s.tile_groups else sys.maxsize] * groups
    rows_per_group = s.rows // groups
    skips = Skips()
    while len(rows[-1]) == 0 or s.pack:
      element, state = self._next_element()
      if skips.take(element):
        continue
      need = (len(element.tokens), element.slots)
      r = next(
        (
          r
          for r in range(s.rows)
          if room[r][0] >= need[0]
          and room[r][1] >= need[1]
          and tiles_left[r // rows_per_group] >= element.tiles
          and (s.pack or not rows[r])
        ),
        None,
      )
      if r is None:
        self._pending = (element, state)
        break
      rows[r].append(element)
      room[r][0] -= need[0]
      room[r][1] -= need[1]
      tiles_left[r // rows_per_group] -= element.tiles
    images = (
      s.tile_groups.collate(rows) if s.tile_groups else square_images(rows, s.max_images, s.image_shape, s.image_dtype)
    )
    batch = {**images, **collate_text(rows, s.seq_len, s.pad_id)}
    batch.update(skips.batch_fields(), stream_position=self._next_start())
    return batch

  def _next_start(self) -> int | None:
    pending = self._pending is not None and self._read is not None
    return self._read - 1 if pending else self._read

  def get_state(self) -> dict[str, Any]:
    return self._state(self._pending[1] if self._pending is not None else self._parent.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    super().set_state(state)
    self._pending = None
