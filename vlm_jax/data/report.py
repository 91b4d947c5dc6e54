"""`vlm-jax data`: what the model will see. Decoded samples with the supervised tokens marked,
token and image-token counts, the fraction supervised; or (--json) one pass over every source."""

import collections
import dataclasses
import sys
from typing import Iterator, TextIO

import ml_collections

from vlm_jax.data import anyres_batch, sources as sources_lib
from vlm_jax.data import images as images_lib
from vlm_jax.data.prepare import Prepare, Prepared, Skipped
from vlm_jax.data.templates import get_template
from vlm_jax.data.tokenizer import Tokenizer

GREEN, RESET = "\033[32m", "\033[0m"


@dataclasses.dataclass
class Totals:
  examples: int = 0
  tokens: int = 0
  supervised_tokens: int = 0
  image_tokens: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, item: Prepared | Skipped, image_id: int) -> None:
    if isinstance(item, Skipped):
      self.skipped[item.reason] += 1
      return
    self.examples += 1
    self.tokens += len(item.tokens)
    self.supervised_tokens += int(item.loss_mask.sum())
    self.image_tokens += int((item.tokens == image_id).sum())

  def to_json(self) -> dict:
    return {
      "examples": self.examples,
      "skipped": dict(sorted(self.skipped.items())),
      "tokens": self.tokens,
      "supervised_tokens": self.supervised_tokens,
      "image_tokens": self.image_tokens,
    }


def samples(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, image_tokens: int, spec: str, limit: int | None = None
) -> Iterator[Prepared | Skipped]:
  """Each source's samples in file order (at most `limit` of each), prepared as training does."""
  d = config.data
  get_template(d.template)
  options = sources_lib.Options(config.seed, config.model.vision.image_size, d.image_position, d.tfds_dir)
  sources, _ = sources_lib.open_mixture(spec, options)
  prepare = Prepare(
    sources,
    tokenizer,
    template=d.template,
    image_tokens=image_tokens,
    seq_len=d.seq_len,
    max_images=d.max_images,
    preprocessing=images_lib.Preprocessing.from_config(config),
    anyres=anyres_batch.for_config(config, image_tokens),
  )  # tile pools depend on the mesh: not checked here
  for k, source in enumerate(sources):
    for index in range(len(source) if limit is None else min(limit, len(source))):
      yield prepare((k, index))


def marked_text(item: Prepared, tokenizer: Tokenizer, color: bool) -> str:
  """The sample's text, supervised runs in green (or between [[ ]]), image slots as <image×N>."""
  out, i, ids, mask = [], 0, item.tokens.tolist(), item.loss_mask.tolist()
  while i < len(ids):
    j = i
    if ids[i] == tokenizer.image_id:
      while j < len(ids) and ids[j] == tokenizer.image_id:
        j += 1
      out.append(f"<image×{j - i}>")
    else:
      while j < len(ids) and mask[j] == mask[i] and ids[j] != tokenizer.image_id:
        j += 1
      text = "".join(_piece(tokenizer, t) for t in ids[i:j])
      out.append((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if mask[i] else text)
    i = j
  return "".join(out)


def _piece(tokenizer: Tokenizer, token: int) -> str:
  """Special tokens by name (decode drops them), others as decoded."""
  names = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
  return names.get(token) or tokenizer.decode([token])


def print_samples(items: Iterator[Prepared | Skipped], tokenizer: Tokenizer, n: int, out: TextIO | None = None) -> None:
  out = out or sys.stdout  # sys.stdout when called, not when imported
  color = out.isatty()
  shown = 0
  for item in items:
    if isinstance(item, Skipped):
      print(f"skipped ({item.reason}): {item.message}\n", file=out)
      continue
    supervised = int(item.loss_mask.sum())
    n_image = int((item.tokens == tokenizer.image_id).sum())
    print(
      f"--- {item.key}: {len(item.tokens)} tokens, {n_image} image tokens ({len(item.images)} images), "
      f"{supervised} supervised ({supervised / len(item.tokens):.1%})",
      file=out,
    )
    print(marked_text(item, tokenizer, color) + "\n", file=out)
    shown += 1
    if shown >= n:
      break
  if not color:
    print("([[...]]: supervised tokens)", file=out)


def pass_totals(items: Iterator[Prepared | Skipped], image_id: int) -> Totals:
  totals = Totals()
  for item in items:
    totals.add(item, image_id)
  return totals
