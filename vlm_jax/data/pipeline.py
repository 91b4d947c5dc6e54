"""The grain input pipeline: sources -> order -> prepare -> pack -> batch -> prefetch.

Order: each source is one endless global stream, shuffled anew every epoch, and process p of n
takes its positions p, p + n, p + 2n, ... (disjoint shards that cover it); a mixture interleaves
the sources by weight. One source with unpacked rows is read the same on any process count:
global batch k holds global positions [k B, (k + 1) B), so a run may continue on another one.
Samples are prepared (tokens, loss mask, decoded and resized images) in `threads` reader
threads, and batches are assembled and prefetched in `workers` processes (0: in this process,
with a prefetch thread). Everything is a function of
the config and the position in the stream, and the position (grain's iterator state) is saved
with each checkpoint, so a resumed run sees exactly the samples an unbroken run would.
"""

import logging
import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from vlm_jax.data import anyres_batch, sources as sources_lib
from vlm_jax.data.pairs import PairBatches, PreparePair
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.packing import ImagePool, PackBatches, TileGroups
from vlm_jax.data.prepare import Prepare
from vlm_jax.data.templates import check_tokenizer
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError

log = logging.getLogger(__name__)

# Batch entries that stay on the host: sample ids and which image slots hold an image (for tests,
# logs and reports; the model reads the placeholders in the tokens instead).
HOST_ONLY = ("keys", "image_mask")
# What a batch holds (a task's `layout`, vlm_jax/tasks.py): conversations (tokens, loss mask,
# images in placeholder slots; packing, pools, AnyRes) | pairs (one image and its caption's tokens a row)
LAYOUTS = ("conversations", "pairs")


class EpochOrder:
  """Position j of this process's stream of one source -> (source number, sample index).

  Infinite: global position g = p + j n; epoch g // size uses its own permutation (index_shuffle:
  no O(n) table).
  """

  def __init__(self, source_number: int, size: int, seed: int, process_index: int, process_count: int):
    self.k, self.size = source_number, size
    self.p, self.n = process_index, process_count
    self.seed = int(np.random.SeedSequence([seed, source_number]).generate_state(1)[0])

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, j: int) -> tuple[int, int]:
    epoch, position = divmod(self.p + j * self.n, self.size)
    if self.size == 1:
      return self.k, 0
    return self.k, int(
      grain.experimental.index_shuffle(position, max_index=self.size - 1, seed=(self.seed + epoch) % 2**32, rounds=4)
    )

  def __repr__(self) -> str:  # grain checks repr() of sources on restore
    return f"EpochOrder({self.k}, {self.size}, {self.seed}, {self.p}, {self.n})"


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; the CLI does not use absl, so mark them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def device_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """The arrays that go to the device (without the host-only entries)."""
  return {k: v for k, v in batch.items() if k not in HOST_ONLY}


class Batches:
  """Infinite iterator of this process's batches ({name: array} + host-only `keys`); resumable
  via get_state/set_state. `skipped` counts the rejected samples by reason."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    image_tokens: int,
    *,
    spec: str | None = None,
    preprocessing: Preprocessing | None = None,
    process_index: int = 0,
    process_count: int = 1,
    tile_groups: int = 1,
    layout: str = "conversations",
  ):
    """What config.data, train.batch_size (global), seed and model.anyres say, read from `spec`
    (default: config.data.sources); preprocessing: default Preprocessing.from_config(config);
    tile_groups (AnyRes, image pools): batch shards x grad_accum, so that each group lives on one
    device; layout: the task's (LAYOUTS)."""
    d, spec = config.data, spec or config.data.sources
    preprocessing = preprocessing or Preprocessing.from_config(config)
    anyres = anyres_batch.for_config(config, image_tokens)
    if layout not in LAYOUTS:
      raise ValueError(f"batch layout {layout!r} is not one of {LAYOUTS}")
    if layout == "conversations":
      check_tokenizer(d.template, tokenizer)  # fails now, not at the first batch
    if config.train.batch_size <= 0 or config.train.batch_size % process_count:
      raise UserError(
        f"batch size {config.train.batch_size} is not a positive multiple of the {process_count} processes"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    for name, value, low in (
      ("seq_len", d.seq_len, 1),
      ("max_images", d.max_images, 1),
      ("workers", d.workers, 0),
      ("threads", d.threads, 0),
      ("prefetch", d.prefetch, 0),
    ):
      if value < low:
        raise UserError(f"config.data.{name} must be >= {low}, got {value}")
    self.spec, self.strict, self.process_count = spec, d.strict, process_count
    self.local_batch_size = config.train.batch_size // process_count
    image_size = preprocessing.size
    options = sources_lib.Options(config.seed, image_size, d.image_position, d.tfds_dir)
    sources, weights = sources_lib.open_mixture(spec, options)
    # AnyRes (and data.image_pool): the batch's rows form tile_groups groups (tile_groups: global,
    # a multiple of the batch shards x micro-batches), each with a pool of tile slots from
    # model.anyres.max_tiles (data.image_pool).
    groups = None
    if (anyres or d.image_pool) and tile_groups % process_count:
      raise UserError(
        f"{tile_groups} tile groups (batch shards x grad_accum) do not split over {process_count} processes"
      )
    if anyres:
      per_group = anyres.tiles_per_group(config.model.anyres.max_tiles, tile_groups, config.train.batch_size)
      groups = TileGroups(anyres, tile_groups // process_count, per_group, d.seq_len)
    elif d.image_pool:
      if d.image_pool % tile_groups:
        raise UserError(
          f"config.data.image_pool ({d.image_pool}) must be a positive multiple of the {tile_groups} "
          "tile groups (batch shards x grad_accum)"
        )
      groups = ImagePool(
        tile_groups // process_count,
        d.image_pool // tile_groups,
        (image_size, image_size),
        preprocessing.dtype,
        image_tokens,
        d.max_images * image_tokens,
      )
    if layout == "pairs":
      self.prepare = PreparePair(sources, tokenizer, seq_len=d.seq_len, preprocessing=preprocessing)
    else:
      self.prepare = Prepare(
        sources,
        tokenizer,
        template=d.template,
        image_tokens=image_tokens,
        seq_len=d.seq_len,
        max_images=d.max_images,
        preprocessing=preprocessing,
        anyres=anyres,
        max_tiles=groups.tiles_per_group if groups else sys.maxsize,
      )
    orders = [
      grain.MapDataset.source(EpochOrder(k, len(s), config.seed, process_index, process_count))
      for k, s in enumerate(sources)
    ]
    ordered = orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, weights)

    def iterate(start: int) -> tuple[grain.DatasetIterator, int | None]:
      """This process's batches from position `start` of its stream, and that position as the
      batches will count it: None with several worker processes, which each read a slice of the
      stream, so that their batchers' counts are not positions in it."""
      counted = start if d.workers <= 1 else None
      # Reader threads prepare samples in order (PIL releases the GIL while decoding/resizing).
      it = (
        ordered[start:]
        .map(self.prepare)
        .to_iter_dataset(grain.ReadOptions(num_threads=d.threads, prefetch_buffer_size=max(2 * d.threads, 1)))
      )
      if layout == "pairs":
        it = PairBatches(it, rows=self.local_batch_size, start=counted)
      else:
        it = PackBatches(
          it,
          rows=self.local_batch_size,
          seq_len=d.seq_len,
          max_images=d.max_images,
          image_shape=(image_size, image_size),
          pad_id=tokenizer.pad_id,
          pack=d.pack,
          tile_groups=groups,
          image_dtype=preprocessing.dtype,
          start=counted,
        )
      if d.workers:
        _absl_flags_parsed()
        it = it.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=d.workers, per_worker_buffer_size=max(d.prefetch, 1))
        )
      elif d.prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch)
      return iter(it), counted

    self._iterate = iterate
    # position: where the next batch starts in this process's stream (None: not known, see
    # continue_from). Ours, not read from grain's iterator state, whose layout grain owns.
    self._it, self.position = iterate(0)
    self.skipped: dict[str, int] = {}

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._it)
    self.position = batch.pop("stream_position")
    messages = batch.pop("skip_messages")
    for reason, count in batch.pop("skipped").items():
      if self.strict:
        raise UserError(f"{messages[reason]} (data.strict=True; False skips and counts such samples)")
      if reason not in self.skipped:
        log.warning(
          "data: skipping %s (further %r skips are only counted in data/skipped/%s; "
          "data.strict=True makes them errors)",
          messages[reason],
          reason,
          reason,
        )
      self.skipped[reason] = self.skipped.get(reason, 0) + count
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position in the stream."""
    return {"loader": self._it.get_state(), "position": self.position, "skipped": dict(self.skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where get_state() was taken."""
    try:
      loader = state["loader"]
      skipped = {str(k): int(v) for k, v in state.get("skipped", {}).items()}
      self._it.set_state(loader)
      self.position = state.get("position")  # a state written before positions were kept has none
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise UserError(
        f"data iterator state {state!r:.100}: malformed ({type(e).__name__}: {e}); "
        "was it written by another version of the pipeline?"
      ) from None
    self.skipped = skipped

  def continue_from(self, states: list[dict[str, Any]], process_index: int) -> str | None:
    """Sets the state this process continues from, given the states of all the processes that
    saved a checkpoint; a message when their number differs from this run's.

    The same number: each takes its own state (exact). Another number: the saved stream
    positions j_p of n processes become the first global position G = min_p(p + j_p n) that its
    owner has not read, and process q of m starts at its first position >= G. Unpacked rows of
    one source keep all processes at the same j, so G is exactly where the run was; packing or
    skipped samples leave them apart, and the samples read past G are read again.
    """
    n, m = len(states), self.process_count
    if n == m:
      self.set_state(states[process_index])
      return None
    positions = [s.get("position") for s in states]
    if None in positions:
      raise UserError(
        f"data iterator state: no stream position to move from {n} to {m} processes (config.data."
        f"workers > 1 read the stream in slices, or an older vlm-jax wrote it); resume on {n} processes"
      )
    first_unread = min(p + j * n for p, j in enumerate(positions))
    mine = max(0, -(-(first_unread - process_index) // m))
    self.close()
    self._it, self.position = self._iterate(mine)
    self.skipped = {}
    for s in states if process_index == 0 else ():  # the counts carry on in process 0's log
      for reason, count in s.get("skipped", {}).items():
        self.skipped[reason] = self.skipped.get(reason, 0) + count
    again = max(p + j * n for p, j in enumerate(positions)) - first_unread
    return f"data: {n} processes' positions continued on {m}: from global sample {first_unread}" + (
      f" (up to {again} samples past it are read again: packing or skips left the processes apart)"
      if again > n - 1
      else " (exact)"
    )

  def close(self) -> None:
    """Stops the worker processes, if any."""
    close = getattr(self._it, "close", None)
    if close:
      close()
