"""Sentencepiece tokenizer wrapper with the special ids the pipeline needs.

`python -m vlm_jax.data.tokenizer OUT_PREFIX` retrains the shipped `shapes` tokenizer
(writes OUT_PREFIX.model); it is deterministic, so the asset can be checked against the code.
"""

import io
import os
import pathlib
import sys

import sentencepiece as spm

from vlm_jax.errors import UserError

IMAGE = "<image>"
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
  adds_bos = True       # BOS starts every sequence (export writes add_bos_token: true to match)

  @classmethod
  def load(cls, spec: str) -> "Tokenizer":
    """`shapes` (the shipped model), a sentencepiece .model file, or a Hugging Face model
    directory / tokenizer.json (data.hf_tokenizer.HFTokenizer, same interface)."""
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


# Generic English, so that free-form prompts get real subwords, not only bytes.
_ENGLISH = """\
Describe the image in detail.
What is in the picture? Please answer with a single word.
Look at the image and answer the question below.
The quick brown fox jumps over the lazy dog.
There is a small red ball on the table next to a large blue box.
How many objects can you see, and where are they?
Is the object on the left side or on the right side of the image?
Which one is bigger, the first or the second?
A photo of a cat sitting on a chair by the window.
Two people are walking down the street in the rain.
The sky is clear and the sun is shining over the green hills.
Can you tell me what this is used for?
Answer the question using a single word or phrase.
This is a simple picture with a few colored shapes on a plain background.
Give a short answer. Be precise and do not guess.
The image shows a dark background with bright objects in the middle.
I think it is at the top, near the bottom, or in the center.
They were not sure if it was there before, but now it is here.
We have some time, so let us look at all of them again.
Where is the dog? It is under the tree, behind the house.
What does the text say? Read it from the top to the bottom.
Please write a caption for this image.
Yes. No. Maybe. I do not know.
The numbers are 0 1 2 3 4 5 6 7 8 9 10 100 and 2024.
Hello, world! (This is a test: a, b, c; x - y = z.) "Quotes" and 'apostrophes' too.
"""


def _shapes_corpus() -> list[str]:
  """Every question template, colour, shape and number, in conversation form and alone."""
  # Imported here: shapes imports templates, which imports this module.
  from vlm_jax.data import shapes
  qa = []
  for s in shapes.SHAPES:
    for c in shapes.COLORS:
      qa.append((shapes.QUESTIONS["color"].format(shape=s), c))
      qa.append((shapes.QUESTIONS["shape"].format(color=c), s))
    for side in shapes.SIDES:
      qa.append((shapes.QUESTIONS["side"].format(shape=s), side))
  for n in shapes.NUMBERS:
    qa.append((shapes.QUESTIONS["count"], n))
  lines = []
  for q, a in qa:
    lines.append(f"USER: {IMAGE} {q} ASSISTANT: {a}")  # the "simple" chat template
    lines.append(q)
  answers = list(shapes.COLORS) + list(shapes.SHAPES) + list(shapes.NUMBERS) + list(shapes.SIDES)
  # Answers alone and mid-sentence, so each is one piece with and without a leading space.
  lines += answers + [" ".join(answers)] * 4
  return lines


def train_shapes_tokenizer(out_prefix: str, vocab_size: int = 512) -> str:
  """Trains the `shapes` tokenizer (BPE, byte fallback); writes and returns OUT_PREFIX.model."""
  # The shapes text repeated so its words win the merges; English fills the rest.
  corpus = _shapes_corpus() * 8 + _ENGLISH.splitlines()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=[IMAGE],
      # Identity normalisation and kept whitespace: decode(encode(text)) == text, and no dummy
      # prefix, so template pieces encoded one by one equal the whole text's encoding.
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      split_digits=True, num_threads=1, minloglevel=2)
  path = out_prefix + ".model"
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_bytes(model.getvalue())
  return path


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m vlm_jax.data.tokenizer OUT_PREFIX (e.g. vlm_jax/data/assets/shapes)")
  print(train_shapes_tokenizer(sys.argv[1]))
