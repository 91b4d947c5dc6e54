"""The built-in synthetic visual-QA set: coloured shapes and one-word answers.

Every example is drawn on the fly from (seed, split, index), so the set needs no download,
is identical on every host, and any example can be regenerated from its index alone.
"""

import dataclasses
import string
import zlib

import numpy as np

from vlm_jax.data.templates import place_image
from vlm_jax.errors import UserError

SHAPES = ("circle", "square", "triangle")
# Far apart in RGB and from both backgrounds, so a tiny model (and a pixel test) can tell them.
COLORS = {
  "red": (220, 30, 30),
  "green": (30, 170, 50),
  "blue": (30, 70, 230),
  "yellow": (240, 220, 20),
  "purple": (140, 40, 190),
  "orange": (250, 140, 0),
}
BACKGROUNDS = {"light": (235, 235, 235), "dark": (25, 25, 25)}
NUMBERS = ("one", "two", "three")
SIDES = ("left", "right")
KINDS = ("color", "shape", "count", "side")
SPLITS = {"train": 0, "test": 1, "wide": 2, "wide_test": 3}  # Part of the rng seed: the splits never share a stream.

QUESTIONS = {
  "color": "What color is the {shape}?",
  "shape": "What shape is {color}?",
  "count": "How many shapes are there?",
  "side": "Which side is the {shape} on?",
}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One drawn object: a shape type, a colour name, its centre and size in pixels."""

  shape: str
  color: str
  cx: float
  cy: float
  size: float


@dataclasses.dataclass
class Example:
  """An image, a conversation about it, and the expected one-word answer."""

  image: np.ndarray  # uint8 [S, S, 3]
  turns: list[tuple[str, str]]  # (role, text), role in {"user", "assistant"}
  answer: str
  kind: str  # one of KINDS
  objects: tuple[Shape, ...] = ()


def draw_shapes(
  objects: list[Shape] | tuple[Shape, ...],
  image_size: int | tuple[int, int],
  background: str | tuple[int, int, int] = "light",
) -> np.ndarray:
  """Draws filled shapes on a plain background; returns uint8 [H, W, 3] (image_size: a square's
  side or (H, W))."""
  if isinstance(background, str):
    background = BACKGROUNDS[background]
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  image = np.empty((height, width, 3), np.uint8)
  image[:] = background
  for o in objects:
    half = o.size / 2
    # Only the pixels of the bounding square are tested (much faster than the whole image).
    x0, x1 = max(int(o.cx - half), 0), min(int(np.ceil(o.cx + half)) + 1, width)
    y0, y1 = max(int(o.cy - half), 0), min(int(np.ceil(o.cy + half)) + 1, height)
    # Pixel centres, so a shape covers the pixels whose centre lies inside it.
    y, x = np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5
    if o.shape == "circle":
      inside = (x - o.cx) ** 2 + (y - o.cy) ** 2 <= half**2
    elif o.shape == "square":
      inside = (np.abs(x - o.cx) <= half) & (np.abs(y - o.cy) <= half)
    elif o.shape == "triangle":
      # Apex up, base at the bottom; half-width grows by 1/2 per pixel below the apex.
      top = o.cy - half
      inside = (y >= top) & (y <= o.cy + half) & (np.abs(x - o.cx) <= (y - top) / 2)
    else:
      raise ValueError(f"unknown shape {o.shape!r}")
    image[y0:y1, x0:x1][inside] = COLORS[o.color]
  return image


GRID = 4  # Shapes sit in the cells of a GRID x GRID layout, one shape per cell.


def _layout(rng: np.random.Generator, image_size: int) -> list[Shape]:
  """1-3 shapes of distinct types and colours, centred in distinct grid cells, 3/4 of a cell wide.

  With patch = cell size (16 px at 64), each shape fills one patch exactly: a from-scratch ViT
  tells the shapes apart within the default config's CPU budget (with free positions and sizes
  it needs far more steps), while which cells, colours and how many still vary per image.
  """
  n = int(rng.integers(1, 4))
  types = rng.permutation(len(SHAPES))[:n]
  colors = rng.permutation(len(COLORS))[:n]
  cells = rng.permutation(GRID * GRID)[:n]
  names = list(COLORS)
  cell = image_size / GRID
  return [
    Shape(SHAPES[t], names[c], (k % GRID + 0.5) * cell, (k // GRID + 0.5) * cell, 0.75 * cell)
    for t, c, k in zip(types, colors, cells)
  ]


HELD_OUT = 8  # 1 in HELD_OUT possible images belongs to the test split; training never draws them.


def _is_held_out(objects: list[Shape], background: str) -> bool:
  """A stable hash of the whole image content, so a test image is never a training image.

  Coordinates go in as floats: Shape(.., 8, ..) and Shape(.., 8.0, ..) draw the same image.
  """
  key = repr((background, sorted((o.shape, o.color, float(o.cx), float(o.cy), float(o.size)) for o in objects)))
  return zlib.crc32(key.encode()) % HELD_OUT == 0


def _question(rng: np.random.Generator, kind: str, objects: list[Shape], image_size: int) -> tuple[str, str]:
  """Returns (question, answer) of the given kind about the objects."""
  o = objects[int(rng.integers(len(objects)))]
  if kind == "color":
    return QUESTIONS[kind].format(shape=o.shape), o.color
  if kind == "shape":
    return QUESTIONS[kind].format(color=o.color), o.shape
  if kind == "count":
    return QUESTIONS[kind], NUMBERS[len(objects) - 1]
  # Grid cells never straddle the vertical midline, so the side is never ambiguous.
  return QUESTIONS[kind].format(shape=o.shape), SIDES[int(o.cx >= image_size / 2)]


def make_example(seed: int, split: str, index: int, image_size: int = 64, image_position: str = "before") -> Example:
  """The example `index` of `split`, a pure function of its arguments.

  A training example asks every question kind, in random order (a multi-turn conversation:
  several supervised answers per encoded image); a test example asks one, of a kind drawn
  uniformly. `answer` and `kind` describe the first round. The image goes with the first
  question, on its own line before or after it (`image_position`).
  """
  if split not in SPLITS:
    raise UserError(f"shapes: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
  if split in WIDE:
    return _wide_example(seed, split, index, image_position)
  rng = np.random.default_rng([seed, SPLITS[split], index])
  while True:  # rejection sampling: the split decides which images it may hold
    background = ("light", "dark")[int(rng.integers(2))]
    objects = _layout(rng, image_size)
    if _is_held_out(objects, background) == (split == "test"):
      break
  kinds = [KINDS[i] for i in rng.permutation(len(KINDS))]
  rounds = [_question(rng, kind, objects, image_size) for kind in (kinds if split == "train" else kinds[:1])]
  turns = []
  for i, (question, answer) in enumerate(rounds):
    turns += [("user", place_image(question, image_position) if i == 0 else question), ("assistant", answer)]
  return Example(draw_shapes(objects, image_size, background), turns, rounds[0][1], kinds[0], tuple(objects))


# --- wide / wide_test: fine detail in wide images (the AnyRes demonstration) -----------------
# One shape, 3/4 of a 16-px cell wide, in a random cell of a 2 x 8..12-cell strip (32 x 128..192
# px), and one question: which shape it is. One 32-px view of the strip squashes the shape to
# 2-3 px across; 32-px AnyRes tiles see it whole. (Its colour would survive the squash, so it is
# not asked.)
WIDE = {"wide": "train", "wide_test": "test"}
WIDE_CELL, WIDE_ROWS, WIDE_COLS = 16, 2, (8, 10, 12)
WIDE_QUESTION = "What shape is in the image?"


def _wide_example(seed: int, split: str, index: int, image_position: str) -> Example:
  rng = np.random.default_rng([seed, SPLITS[split], index])
  while True:  # rejection sampling, as make_example: wide_test images never appear in wide
    background = ("light", "dark")[int(rng.integers(2))]
    cols = WIDE_COLS[int(rng.integers(len(WIDE_COLS)))]
    cell = int(rng.integers(WIDE_ROWS * cols))
    o = Shape(
      SHAPES[int(rng.integers(len(SHAPES)))],
      list(COLORS)[int(rng.integers(len(COLORS)))],
      (cell % cols + 0.5) * WIDE_CELL,
      (cell // cols + 0.5) * WIDE_CELL,
      0.75 * WIDE_CELL,
    )
    if _is_held_out([o], background) == (WIDE[split] == "test"):
      break
  image = draw_shapes([o], (WIDE_ROWS * WIDE_CELL, cols * WIDE_CELL), background)
  turns = [("user", place_image(WIDE_QUESTION, image_position)), ("assistant", o.shape)]
  return Example(image, turns, o.shape, "shape", (o,))


def caption(objects: tuple[Shape, ...] | list[Shape]) -> str:
  """What the image shows, for contrastive training: 'two shapes: a red circle and a blue
  square', the shapes left to right (then top to bottom)."""
  ordered = sorted(objects, key=lambda o: (o.cx, o.cy))
  things = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in ordered]
  listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
  return f"{NUMBERS[len(objects) - 1]} shape{'s' if len(objects) > 1 else ''}: {listed}"


def _one(shape: str, color: str) -> str:
  return caption([Shape(shape, color, 0.0, 0.0, 0.0)])


# Zero-shot classification (eval/zeroshot.py): per kind, the class names and each class's
# prompts, whose mean text embedding stands for the class (prompt ensembling, as CLIP's); the
# colour of "one shape: a red circle", "... square", "... triangle".
ZEROSHOT = {
  "color": (tuple(COLORS), tuple(tuple(_one(s, c) for s in SHAPES) for c in COLORS)),
  "shape": (SHAPES, tuple(tuple(_one(s, c) for c in COLORS) for s in SHAPES)),
  "count": (NUMBERS, tuple((f"{n} shape{'s' if i else ''}",) for i, n in enumerate(NUMBERS))),
}


def zeroshot_label(example: Example, kind: str) -> int | None:
  """The index of the example's class among ZEROSHOT[kind]'s, or None: the example does not
  count for that kind (the colour or shape of an image with several shapes)."""
  objects = example.objects
  if kind == "count":
    return len(objects) - 1
  if len(objects) != 1:
    return None
  return ZEROSHOT[kind][0].index(objects[0].color if kind == "color" else objects[0].shape)


def normalize_answer(text: str) -> str:
  """Lowercase, punctuation removed, whitespace collapsed."""
  text = text.lower().translate(str.maketrans("", "", string.punctuation))
  return " ".join(text.split())


def answer_matches(prediction: str, answer: str) -> bool:
  """Exact match after normalisation: 'Red.' matches 'red', 'dark red' does not."""
  return normalize_answer(prediction) == normalize_answer(answer)
