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

import json
import logging
import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from vlm_jax.data import anyres_batch, sources as sources_lib
from vlm_jax.data.pairs import PairBatches, PreparePair
from vlm_jax.data.anyres_batch import AnyRes
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.packing import ImagePool, PackBatches, TileGroups
from vlm_jax.data.prepare import Prepare
from vlm_jax.data.templates import check_tokenizer
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError

log = logging.getLogger(__name__)

HOST_ONLY = ("keys",)  # batch entries that stay on the host (sample ids, for tests and logs)
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
    return self.k, int(grain.experimental.index_shuffle(
        position, max_index=self.size - 1, seed=(self.seed + epoch) % 2**32, rounds=4))

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

  def __init__(self, spec: str, *, tokenizer: Tokenizer, seq_len: int, global_batch_size: int,
               preprocessing: Preprocessing, image_tokens: int, seed: int, template: str = "simple", process_index: int = 0,
               process_count: int = 1, strict: bool = False, image_position: str = "before",
               max_images: int = 1, pack: bool = False, workers: int = 0, threads: int = 4,
               prefetch: int = 2, tfds_dir: str = "", anyres: AnyRes | None = None, tile_groups: int = 1,
               max_tiles: int = 0, image_pool: int = 0, layout: str = "conversations"):
    if layout not in LAYOUTS:
      raise ValueError(f"batch layout {layout!r} is not one of {LAYOUTS}")
    if layout == "conversations":
      check_tokenizer(template, tokenizer)  # fails now, not at the first batch
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise UserError(f"batch size {global_batch_size} is not a positive multiple of the "
                      f"{process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    for name, value, low in (("seq_len", seq_len, 1), ("max_images", max_images, 1),
                             ("workers", workers, 0), ("threads", threads, 0), ("prefetch", prefetch, 0)):
      if value < low:
        raise UserError(f"config.data.{name} must be >= {low}, got {value}")
    self.spec, self.strict, self.process_count = spec, strict, process_count
    self.local_batch_size = global_batch_size // process_count
    image_size = preprocessing.size
    options = sources_lib.Options(seed, image_size, image_position, tfds_dir)
    sources, weights = sources_lib.open_mixture(spec, options)
    # AnyRes (and image_pool): the batch's rows form tile_groups groups (tile_groups: global, a
    # multiple of the batch shards x micro-batches), each with a pool of tile slots from max_tiles
    # (image_pool).
    groups = None
    if (anyres or image_pool) and tile_groups % process_count:
      raise UserError(f"{tile_groups} tile groups (batch shards x grad_accum) do not split over "
                      f"{process_count} processes")
    if anyres:
      groups = TileGroups(anyres, tile_groups // process_count,
                          anyres.tiles_per_group(max_tiles, tile_groups, global_batch_size), seq_len)
    elif image_pool:
      if image_pool % tile_groups:
        raise UserError(f"config.data.image_pool ({image_pool}) must be a positive multiple of the {tile_groups} "
                        "tile groups (batch shards x grad_accum)")
      groups = ImagePool(tile_groups // process_count, image_pool // tile_groups, (image_size, image_size),
                         preprocessing.dtype, image_tokens, max_images * image_tokens)
    if layout == "pairs":
      self.prepare = PreparePair(sources, tokenizer, seq_len=seq_len, preprocessing=preprocessing)
    else:
      self.prepare = Prepare(sources, tokenizer, template=template, image_tokens=image_tokens,
                             seq_len=seq_len, max_images=max_images,
                             preprocessing=preprocessing,
                             anyres=anyres, max_tiles=groups.tiles_per_group if groups else sys.maxsize)
    orders = [grain.MapDataset.source(EpochOrder(k, len(s), seed, process_index, process_count))
              for k, s in enumerate(sources)]
    ds = orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, weights)
    # Reader threads prepare samples in order (PIL releases the GIL while decoding/resizing).
    it = ds.map(self.prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * threads, 1)))
    if layout == "pairs":
      it = PairBatches(it, rows=self.local_batch_size)
    else:
      it = PackBatches(it, rows=self.local_batch_size, seq_len=seq_len, max_images=max_images,
                       image_shape=(image_size, image_size), pad_id=tokenizer.pad_id, pack=pack,
                       tile_groups=groups, image_dtype=preprocessing.dtype)
    if workers:
      _absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=max(prefetch, 1)))
    elif prefetch:
      it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    self._it = iter(it)
    self.skipped: dict[str, int] = {}

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, tokenizer: Tokenizer, image_tokens: int, *,
                  spec: str | None = None, process_index: int = 0, process_count: int = 1,
                  tile_groups: int = 1, layout: str = "conversations") -> "Batches":
    """tile_groups (AnyRes): batch shards x grad_accum, so that each group lives on one device;
    layout: the task's (LAYOUTS)."""
    d = config.data
    return cls(spec or d.sources, tokenizer=tokenizer, seq_len=d.seq_len,
               global_batch_size=config.train.batch_size, preprocessing=Preprocessing.from_config(config),
               image_tokens=image_tokens, seed=config.seed, template=d.template, process_index=process_index,
               process_count=process_count, strict=d.strict, image_position=d.image_position,
               max_images=d.max_images, pack=d.pack, workers=d.workers, threads=d.threads,
               prefetch=d.prefetch, tfds_dir=d.tfds_dir, anyres=anyres_batch.for_config(config, image_tokens),
               tile_groups=tile_groups, max_tiles=config.model.anyres.max_tiles, image_pool=d.image_pool,
               layout=layout)

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._it)
    messages = batch.pop("skip_messages")
    for reason, count in batch.pop("skipped").items():
      if self.strict:
        raise UserError(f"{messages[reason]} (data.strict=True; False skips and counts such samples)")
      if reason not in self.skipped:
        log.warning("data: skipping %s (further %r skips are only counted in data/skipped/%s; "
                    "data.strict=True makes them errors)", messages[reason], reason, reason)
      self.skipped[reason] = self.skipped.get(reason, 0) + count
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position in the stream."""
    return {"loader": self._it.get_state(), "skipped": dict(self.skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where get_state() was taken."""
    try:
      loader = state["loader"]
      skipped = {str(k): int(v) for k, v in state.get("skipped", {}).items()}
      self._it.set_state(loader)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise UserError(f"data iterator state {state!r:.100}: malformed ({type(e).__name__}: {e}); "
                      "was it written by another version of the pipeline?") from None
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
    try:
      positions = [int(_stream(s["loader"])["next_index"]) for s in states]
    except (KeyError, TypeError) as e:
      raise UserError(f"data iterator state: no stream position to move from {n} to {m} processes "
                      f"({type(e).__name__}: {e}); with config.data.workers > 0 resume on {n} processes") from None
    first_unread = min(p + j * n for p, j in enumerate(positions))
    mine = max(0, -(-(first_unread - process_index) // m))
    loader = json.loads(json.dumps(states[0]["loader"]))
    _stream(loader)["next_index"] = mine
    skipped: dict[str, int] = {}
    for s in states if process_index == 0 else ():  # the counts carry on in process 0's log
      for reason, count in s.get("skipped", {}).items():
        skipped[reason] = skipped.get(reason, 0) + count
    self.set_state({"loader": loader, "skipped": skipped})
    again = max(p + j * n for p, j in enumerate(positions)) - first_unread
    return (f"data: {n} processes' positions continued on {m}: from global sample {first_unread}"
            + (f" (up to {again} samples past it are read again: packing or skips left the processes apart)"
               if again > n - 1 else " (exact)"))

  def close(self) -> None:
    """Stops the worker processes, if any."""
    close = getattr(self._it, "close", None)
    if close:
      close()


def _stream(loader: dict[str, Any]) -> dict[str, Any]:
  """The part of a loader state that holds the sample stream's `next_index` (one reader, no
  worker processes)."""
  while "next_index" not in loader:
    loader = loader["parent"]
  return loader
