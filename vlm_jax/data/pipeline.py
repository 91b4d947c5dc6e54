"""Deterministic, resumable, per-process training batches.

Minimal on purpose (a later issue moves this to grain). The stream is defined globally: every
process walks the same example indices and makes the same skip decisions (they depend on the
text only), then keeps its own contiguous rows, so all processes agree on which example is in
which row without talking to each other, and resuming needs one integer.
"""

import functools
import logging
from typing import Any, Callable, Sequence

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.data import images as images_lib
from vlm_jax.data import shapes
from vlm_jax.data.anyres_batch import AnyRes, Packer
from vlm_jax.data.templates import Encoded, encode_conversation, get_template
from vlm_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A run of this many skipped samples means the data cannot fit the config (e.g. seq_len too
# small for every sample); stop instead of looping forever.
MAX_SKIPPED_IN_A_ROW = 1000


def parse_spec(spec: str) -> tuple[str, str]:
  """'shapes' -> ('shapes', 'train'); 'shapes:test' -> ('shapes', 'test')."""
  kind, _, split = spec.partition(":")
  if kind in ("llava", "tfds"):
    raise UserError(f"data spec {spec!r}: llava/tfds sources are not implemented yet")
  if kind != "shapes":
    raise UserError(f"data spec {spec!r}: unknown source {kind!r} "
                    "(expected shapes[:SPLIT], llava:..., tfds:...)")
  split = split or "train"
  if split not in shapes.SPLITS:
    raise UserError(f"data spec {spec!r}: unknown split {split!r} "
                    f"(shapes has {', '.join(shapes.SPLITS)})")
  return kind, split


def _example_fn(spec: str, seed: int, image_size: int,
                image_position: str) -> Callable[[int], shapes.Example]:
  """index -> Example for a data spec."""
  _, split = parse_spec(spec)
  return functools.partial(shapes.make_example, seed, split, image_size=image_size,
                           image_position=image_position)


def eval_examples(spec: str, n: int, *, seed: int, image_size: int,
                  image_position: str = "before") -> list[shapes.Example]:
  """The first n examples of the spec's split: a fixed held-out set."""
  example = _example_fn(spec, seed, image_size, image_position)
  return [example(i) for i in range(n)]


def collate(encoded_list: Sequence[Encoded], images_list: Sequence[np.ndarray | None],
            seq_len: int, pad_id: int, *, image_size: int | None = None) -> dict[str, np.ndarray]:
  """Encoded samples + preprocessed images (float32 [H, W, 3] or None) -> a batch of arrays.

  tokens/targets/loss_mask/segment_ids/positions are [b, seq_len]; targets[i] = tokens[i + 1],
  and loss_mask[i] says whether that target is supervised. images [b, 1, H, W, 3] with
  image_mask [b, 1] (0 and a zero image for a text-only sample; then `image_size` gives H, W
  if no sample of the batch has an image).
  """
  b = len(encoded_list)
  if len(images_list) != b:
    raise ValueError(f"{b} encoded samples but {len(images_list)} images")
  tokens = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((b, seq_len), np.float32)
  segment_ids = np.zeros((b, seq_len), np.int32)
  positions = np.zeros((b, seq_len), np.int32)
  for r, enc in enumerate(encoded_list):
    n = len(enc.tokens)
    if not n:  # an empty row
      continue
    if n > seq_len:
      raise ValueError(f"row {r}: {n} tokens > seq_len {seq_len}")
    tokens[r, :n] = enc.tokens
    targets[r, :n - 1] = enc.tokens[1:]
    loss_mask[r, :n - 1] = enc.loss_mask[1:]
    segment_ids[r, :n] = 1
    positions[r, :n] = np.arange(n)
  shape = next((im.shape for im in images_list if im is not None), None)
  if shape is None:
    if image_size is None:
      raise ValueError("no image in the batch: pass image_size")
    shape = (image_size, image_size, 3)
  images = np.zeros((b, 1, *shape), np.float32)
  image_mask = np.zeros((b, 1), np.float32)
  for r, im in enumerate(images_list):
    if im is not None:
      images[r, 0] = im
      image_mask[r, 0] = 1
  return {"images": images, "image_mask": image_mask, "tokens": tokens, "targets": targets,
          "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


EMPTY = Encoded(np.zeros(0, np.int32), np.zeros(0, np.bool_))  # a row left empty (AnyRes packing)


class Batches:
  """Infinite iterator of this process's rows of global batches; resumable via get/set_state.

  Global batch g holds the next `global_batch_size` usable examples in index order (indices
  g*B .. g*B+B-1 when nothing is skipped); process p keeps rows p*b .. p*b+b-1, b = B/count.
  """

  def __init__(self, spec: str, *, tokenizer: Tokenizer, seq_len: int, global_batch_size: int,
               image_size: int, image_tokens: int, seed: int, image_mean: Sequence[float],
               image_std: Sequence[float], template: str = "simple", process_index: int = 0,
               process_count: int = 1, strict: bool = False, image_position: str = "before",
               anyres: AnyRes | None = None, tile_groups: int = 1, max_tiles: int = 0):
    self._example = _example_fn(spec, seed, image_size, image_position)
    get_template(template)  # Fails now, not at the first batch.
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise UserError(f"batch size {global_batch_size} is not a positive multiple of the "
                      f"{process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if seq_len <= 0:
      raise UserError(f"seq_len must be positive, got {seq_len}")
    self.spec = spec
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._rows = slice(process_index * self.local_batch_size,
                       (process_index + 1) * self.local_batch_size)
    self.image_size = image_size
    self.image_tokens = image_tokens
    self.template = template
    self.strict = strict
    self._preprocess = functools.partial(images_lib.preprocess, size=image_size,
                                         mean=image_mean, std=image_std)
    # AnyRes: per-image token counts, tiles, and rows placed into tile groups (anyres_batch.py).
    self.anyres, self._tile_groups = anyres, tile_groups
    self._packer = None
    if anyres:
      tiles_per_group = anyres.tiles_per_group(max_tiles, tile_groups, global_batch_size)
      self._packer = Packer(global_batch_size, tile_groups, tiles_per_group)
    self._next_index = 0
    self.skipped: dict[str, int] = {}
    self._warned: set[str] = set()

  def __iter__(self) -> "Batches":
    return self

  def _skip(self, reason: str, index: int, why: str) -> None:
    if self.strict:
      raise UserError(f"data spec {self.spec!r} sample {index}: {why}")
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if reason not in self._warned:
      self._warned.add(reason)
      log.warning("data %r: skipping sample %d: %s (further %r skips are only counted; "
                  "data.strict=True makes them errors)", self.spec, index, why, reason)

  def _encode(self, index: int, example: shapes.Example) -> Encoded | None:
    """The sample's tokens, or None if it is skipped (strict: UserError)."""
    try:
      image_tokens = (self.anyres.tokens(example.image) if self.anyres and example.image is not None
                      else self.image_tokens)
      enc = encode_conversation(example.turns, self.tokenizer, image_tokens, self.template)
    except UserError as e:
      self._skip("invalid", index, str(e))
      return None
    if len(enc.tokens) > self.seq_len:
      self._skip("too_long", index, f"{len(enc.tokens)} tokens > seq_len {self.seq_len}")
      return None
    return enc

  def __next__(self) -> dict[str, np.ndarray]:
    rows: list[tuple[shapes.Example | None, Encoded]] = []
    in_a_row = 0
    if self._packer:
      self._packer.reset()
    while len(rows) < self.global_batch_size:
      index = self._next_index
      self._next_index += 1
      example = self._example(index)
      enc = self._encode(index, example)
      if enc is None:
        in_a_row += 1
        if in_a_row >= MAX_SKIPPED_IN_A_ROW:
          raise UserError(f"data spec {self.spec!r}: {in_a_row} samples in a row skipped "
                          f"(up to sample {index}; skipped so far {self.skipped})")
        continue
      in_a_row = 0
      if self._packer:
        n_tiles = 0 if example.image is None else self.anyres.plan(example.image).tiles
        gap = self._packer.empty_rows_before(n_tiles)
        if gap is None:  # no tile group left: the row starts the next batch
          self._next_index -= 1
          break
        self._packer.add(n_tiles, gap)
        rows += [(None, EMPTY)] * gap
      rows.append((example, enc))
    rows += [(None, EMPTY)] * (self.global_batch_size - len(rows))
    # Only this process's rows pay for image preprocessing.
    mine = rows[self._rows]
    prepare = self.anyres.prepare if self.anyres else self._preprocess
    images = [None if ex is None or ex.image is None else prepare(ex.image) for ex, _ in mine]
    batch = collate([enc for _, enc in mine], [None] * len(mine) if self.anyres else images,
                    self.seq_len, self.tokenizer.pad_id, image_size=self.image_size)
    if self.anyres:
      batch["images"] = self.anyres.collate(images, groups=self._tile_groups * len(mine) // len(rows),
                                            tiles_per_group=self._packer.tiles_per_group,
                                            visual_len=self.seq_len)
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position in the stream."""
    return {"next_index": self._next_index, "skipped": dict(self.skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where get_state() was taken."""
    try:
      next_index = int(state["next_index"])
      skipped = {str(k): int(v) for k, v in state.get("skipped", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise UserError(f"data iterator state {state!r:.100}: malformed ({e})") from None
    self._next_index, self.skipped = next_index, skipped
