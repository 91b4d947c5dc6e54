"""Sentencepiece tokenizer wrapper with the special ids the pipeline needs.

The shipped `shapes` model is trained by data/shapes_tokenizer.py.
"""

import os
import pathlib

import sentencepiece as spm

from vlm_jax.data import IMAGE
from vlm_jax.errors import UserError
from vlm_jax.files import local_files

ASSETS = pathlib.Path(__file__).parent / "assets"
BUILTIN = {"shapes": ASSETS / "shapes.model"}


class Tokenizer:
  """A sentencepiece model; `<image>` is one token, encode adds no BOS/EOS."""

  def __init__(self, processor: spm.SentencePieceProcessor, name: str = "<memory>"):
    self._sp = processor
    self.name = name
    self._image_id = processor.piece_to_id(IMAGE)
    if self._image_id == processor.unk_id() or self.encode(IMAGE) != [self._image_id]:
      raise UserError(f"tokenizer {name}: no {IMAGE} symbol (add it as a user-defined symbol)")
    if processor.bos_id() < 0 or processor.eos_id() < 0:
      raise UserError(f"tokenizer {name}: needs both a BOS and an EOS id")
    # Sentencepiece models may have no pad id (Llama's); padding is always masked, so any id
    # that decode drops will do, and EOS is the usual choice.
    self._pad_id = processor.pad_id() if processor.pad_id() >= 0 else processor.eos_id()
    self._drop = {self._pad_id, self.bos_id, self.eos_id, self._image_id}

  chat_template = None  # the "simple" template is ours; HF tokenizers bring their own
  adds_bos = True  # BOS starts every sequence (export writes add_bos_token: true to match)

  @classmethod
  def load(cls, spec: str) -> "Tokenizer":
    """`shapes` (the shipped model), a sentencepiece .model file, or a Hugging Face model
    directory / tokenizer.json (data.hf_tokenizer.HFTokenizer, same interface)."""
    spec = local_files(spec)  # a tokenizer in a bucket: its files copied here
    if os.path.isdir(spec) or spec.endswith(".json"):
      from vlm_jax.data import hf_tokenizer

      if not os.path.exists(spec):
        raise UserError(f"tokenizer file not found: {spec}")
      return hf_tokenizer.load(spec)
    path = BUILTIN.get(spec, pathlib.Path(spec))
    if not path.is_file():
      raise UserError(f"tokenizer file not found: {spec}")
    try:
      processor = spm.SentencePieceProcessor(model_file=os.fspath(path))
    except (OSError, RuntimeError) as e:
      reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      raise UserError(f"cannot read tokenizer {spec}: {reason}") from None
    return cls(processor, spec)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def image_id(self) -> int:
    return self._image_id

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    """Text of `ids` without pad/BOS/EOS/image ids (byte pieces are joined back into UTF-8)."""
    return self._sp.decode([int(i) for i in ids if int(i) not in self._drop])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def bos_prefix(tokenizer) -> list[int]:
  """[BOS] if the tokenizer puts it in front of text it encodes with special tokens (its
  post-processor or add_bos_token), as transformers' processors tokenize prompts; else []."""
  if tokenizer.bos_id is None or not tokenizer.adds_bos:
    return []
  return [tokenizer.bos_id]
