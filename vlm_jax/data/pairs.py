"""Image-caption pairs for contrastive training: one image and its caption's tokens a row.

A sample's caption is its `caption` field (LLaVA JSON "caption", shapes' description), else its
first assistant turn (LLaVA's stage-1 caption data holds them there). Caption tokens are
[BOS] (if the tokenizer adds it) + the caption + EOS, cut to seq_len with EOS kept last, padded
with the pad id: a fixed length, as SigLIP and CLIP read them.
"""

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from vlm_jax.data import IMAGE
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.packing import CountingIterator, Skips
from vlm_jax.data.prepare import Skipped, decode_image, read_sample
from vlm_jax.data.sources import Sample, Source
from vlm_jax.data.tokenizer import Tokenizer, bos_prefix
from vlm_jax.errors import BadSample


@dataclasses.dataclass(frozen=True)
class Pair:
  key: str
  image: np.ndarray  # [H, W, 3], Preprocessing.dtype
  text: np.ndarray  # int32 [seq_len]


def caption_of(sample: Sample) -> str:
  """The sample's caption (its first assistant turn when it has none), without image markers."""
  text = sample.caption or next((t for role, t in sample.turns if role == "assistant"), "")
  return " ".join(text.replace(IMAGE, " ").split())


def caption_tokens(tokenizer: Tokenizer, caption: str, seq_len: int) -> np.ndarray:
  ids = bos_prefix(tokenizer) + tokenizer.encode(caption)
  ids = ids[: seq_len - 1] + [tokenizer.eos_id]
  return np.asarray(ids + [tokenizer.pad_id] * (seq_len - len(ids)), np.int32)


class PreparePair:
  """(source number, index) -> Pair | Skipped. Picklable, for worker processes."""

  def __init__(self, sources: Sequence[Source], tokenizer: Tokenizer, *, seq_len: int, preprocessing: Preprocessing):
    self.sources, self.tokenizer, self.seq_len, self.preprocessing = list(sources), tokenizer, seq_len, preprocessing

  def __call__(self, item: tuple[int, int]) -> Pair | Skipped:
    return read_sample(self.sources, item, self.prepare)

  def prepare(self, sample: Sample) -> Pair:
    if len(sample.images) != 1:
      raise BadSample("image_count", f"id {sample.key}: a pair needs one image, got {len(sample.images)}")
    caption = caption_of(sample)
    if not caption:
      raise BadSample("no_caption", f"id {sample.key}: no caption (a 'caption' field or an assistant turn)")
    image = self.preprocessing(decode_image(sample.images[0])).astype(self.preprocessing.dtype)
    return Pair(sample.key, image, caption_tokens(self.tokenizer, caption, self.seq_len))


class PairBatches(grain.IterDataset):
  """Pair | Skipped elements -> {"images" [rows, H, W, 3], "text" [rows, seq_len], "keys"} with
  `skipped` and `skip_messages` of the samples rejected since the previous batch (as PackBatches)."""

  def __init__(self, parent: grain.IterDataset, *, rows: int, start: int = 0):
    super().__init__(parent)
    self.rows, self.start = rows, start  # start: the parent's first element's position in the stream

  def __iter__(self) -> grain.DatasetIterator:
    return _PairIterator(self._parent.__iter__(), self.rows, self.start)


class _PairIterator(CountingIterator):
  """Reads no further than its batch, so its state is the parent's (and the count)."""

  def __init__(self, parent: grain.DatasetIterator, rows: int, start: int):
    super().__init__(parent, start)
    self._rows = rows

  def __next__(self) -> dict[str, Any]:
    pairs: list[Pair] = []
    skips = Skips()
    while len(pairs) < self._rows:
      element = self._read_one()
      if not skips.take(element):
        pairs.append(element)
    return {
      "images": np.stack([p.image for p in pairs]),
      "text": np.stack([p.text for p in pairs]),
      "keys": [[p.key] for p in pairs],
      **skips.batch_fields(),
      "stream_position": self._next_start(),
    }

  def get_state(self) -> dict[str, Any]:
    return self._state(self._parent.get_state())
