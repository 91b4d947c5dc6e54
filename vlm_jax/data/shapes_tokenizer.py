"""Trains the shipped `shapes` tokenizer (data/assets/shapes.model).

`python -m vlm_jax.data.shapes_tokenizer OUT_PREFIX` writes OUT_PREFIX.model; training is
deterministic, so the asset can be checked against the code.
"""

import io
import pathlib
import sys

import sentencepiece as spm

from vlm_jax.data import IMAGE, shapes

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
    sentence_iterator=iter(corpus),
    model_writer=model,
    model_type="bpe",
    vocab_size=vocab_size,
    byte_fallback=True,
    character_coverage=1.0,
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    user_defined_symbols=[IMAGE],
    # Identity normalisation and kept whitespace: decode(encode(text)) == text, and no dummy
    # prefix, so template pieces encoded one by one equal the whole text's encoding.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    num_threads=1,
    minloglevel=2,
  )
  path = out_prefix + ".model"
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_bytes(model.getvalue())
  return path


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m vlm_jax.data.shapes_tokenizer OUT_PREFIX (e.g. vlm_jax/data/assets/shapes)")
  print(train_shapes_tokenizer(sys.argv[1]))
