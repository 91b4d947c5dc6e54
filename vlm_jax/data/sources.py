"""Data sources: random access to samples (an id, conversation turns, images) by index.

Specs (docs/data.md): `shapes[:SPLIT]`, `llava:JSON_OR_JSONL[:IMAGE_ROOT]`,
`tfds:NAME[/CONFIG][:SPLIT]`, and weighted mixtures `SPEC=WEIGHT,SPEC=WEIGHT`. Reading a
sample never decodes its images (that is the pipeline's job, in its workers); a sample that
cannot be read raises BadSample, so one bad record is skipped instead of ending the run.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Protocol

import numpy as np

from vlm_jax.data import IMAGE, shapes
from vlm_jax.errors import BadSample, UserError

# The length of one pass over `shapes` (it is generated, so any index is an example).
SHAPES_EPOCH = 2**20
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ImageRef = Any  # a file path (str), encoded bytes, or a uint8 array


@dataclasses.dataclass
class Sample:
  """Evaluation reads the optional fields: `answers` (accepted answers, e.g. VQA's ten; else the
  last assistant turn is the reference), `choices` (multiple choice, in letter order) and
  `category` (scores are also reported per category); contrastive training reads `caption`
  (data/pairs.py)."""

  key: str
  turns: list[tuple[str, str]]
  images: list[ImageRef]
  answers: list[str] = dataclasses.field(default_factory=list)
  choices: list[str] = dataclasses.field(default_factory=list)
  category: str = ""
  caption: str = ""


class Source(Protocol):
  name: str

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Sample: ...


class ShapesSource:
  """The built-in synthetic set; images are drawn on the fly from (seed, split, index)."""

  def __init__(self, split: str, *, seed: int, image_size: int, image_position: str):
    if split not in shapes.SPLITS:
      raise UserError(f"data spec 'shapes:{split}': unknown split {split!r} (shapes has {', '.join(shapes.SPLITS)})")
    self.name = f"shapes:{split}"
    self._make = functools.partial(
      shapes.make_example, seed, split, image_size=image_size, image_position=image_position
    )

  def __len__(self) -> int:
    return SHAPES_EPOCH

  def __getitem__(self, index: int) -> Sample:
    ex = self._make(index)
    return Sample(
      str(index),
      list(ex.turns),
      [] if ex.image is None else [ex.image],
      category=ex.kind,
      caption=shapes.caption(ex.objects),
    )


def _strings(entry: dict, field: str) -> list[str]:
  """An optional list of strings (VQA's answer dicts {"answer": str} too)."""
  value = entry.get(field, [])
  if isinstance(value, str):
    value = [value]
  if isinstance(value, list):
    value = [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in value]
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise BadSample("format", f"{field!r} must be a list of strings, got {entry.get(field)!r:.60}")
  return value


def llava_sample(entry: Any, index: int, image_root: str) -> Sample:
  """A LLaVA record ({"id", "image"?, "conversations": [{"from", "value"}]}, and for evaluation
  "answers"?, "choices" (or "options")?, "category"?) as a Sample.

  A single image's <image> moves to the head of its turn as "<image>\\n" (as LLaVA does);
  several images keep their markers where they are (interleaved).
  """
  if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
    raise BadSample("format", "not a LLaVA record (a dict with a 'conversations' list)")
  image = entry.get("image", [])
  paths = [image] if isinstance(image, str) else image
  if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
    raise BadSample("format", f"'image' must be a path or a list of paths, got {image!r:.60}")
  turns = []
  for i, turn in enumerate(entry["conversations"]):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise BadSample("format", f"turn {i}: expected {{'from', 'value'}}, got {turn!r:.60}")
    role = ROLES.get(turn.get("from"))
    if role is None:
      raise BadSample("role", f"turn {i}: unknown role {turn.get('from')!r} (expected human or gpt)")
    text = turn["value"]
    if len(paths) == 1 and text.count(IMAGE) == 1:
      text = IMAGE + "\n" + text.replace(IMAGE, "").strip()
    turns.append((role, text))
  category, caption = entry.get("category", ""), entry.get("caption", "")
  if not isinstance(caption, str):
    raise BadSample("format", f"'caption' must be a string, got {caption!r:.60}")
  return Sample(
    str(entry.get("id", index)),
    turns,
    [os.path.join(image_root, p) for p in paths],
    _strings(entry, "answers"),
    _strings(entry, "choices" if "choices" in entry else "options"),
    category if isinstance(category, str) else str(category),
    caption,
  )


class LlavaSource:
  """LLaVA JSON (a list of records) or JSONL (one record a line, parsed when read: a broken line
  is one skipped sample). Image paths are relative to IMAGE_ROOT (default: the file's folder)."""

  def __init__(self, path: str, image_root: str = ""):
    self.name = f"llava:{path}"
    if not os.path.isfile(path):
      raise UserError(f"data spec {self.name!r}: file not found: {path}")
    self._root = image_root or os.path.dirname(os.path.abspath(path))
    if image_root and not os.path.isdir(image_root):
      raise UserError(f"data spec {self.name!r}: image root is not a directory: {image_root}")
    with open(path, encoding="utf-8") as f:
      if path.endswith(".jsonl"):
        self._lines, self._entries = [l for l in f.read().splitlines() if l.strip()], None
        return
      try:
        self._entries = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f"data spec {self.name!r}: invalid JSON: {e}") from None
    if not isinstance(self._entries, list):
      raise UserError(f"data spec {self.name!r}: expected a JSON list of records")

  def __len__(self) -> int:
    return len(self._entries if self._entries is not None else self._lines)

  def __getitem__(self, index: int) -> Sample:
    if self._entries is not None:
      return llava_sample(self._entries[index], index, self._root)
    try:
      entry = json.loads(self._lines[index])
    except json.JSONDecodeError as e:
      raise BadSample("format", f"invalid JSON line: {e}") from None
    return llava_sample(entry, index, self._root)


class TfdsSource:
  """A TFDS dataset (array_record, no TensorFlow) through `tfds.data_source`.

  Features: `image` (optional) or `images` (a sequence), and either `conversations` (LLaVA's
  list as JSON text; empty: not used) or `question` + `answer` (one round; "<image>\\n" goes before the question
  when there is an image). `id` names the sample if present; `answers`, `choices` and `category`
  serve evaluation (with `answers`, `answer` may be left out).
  """

  def __init__(self, name: str, split: str, data_dir: str = ""):
    self.name = f"tfds:{name}:{split}"
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise UserError(f"data spec {self.name!r} needs tensorflow-datasets: pip install 'vlm-jax[tfds]'") from None
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises many kinds (not found, no array_record files, ...)
      raise UserError(f"data spec {self.name!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> Sample:
    record = self._ds[index]
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    if "images" in record:
      images = list(record["images"])
    else:
      images = [record["image"]] if "image" in record else []
    key = text(record["id"]) if "id" in record else str(index)
    extra = dict(
      answers=[text(a) for a in record.get("answers", [])],
      choices=[text(c) for c in record.get("choices", [])],
      category=text(record.get("category", "")),
    )
    if text(record.get("conversations", "")):  # an empty text: this sample is question + answer
      try:
        conversations = json.loads(text(record["conversations"]))
      except json.JSONDecodeError as e:
        raise BadSample("format", f"'conversations' is not JSON: {e}") from None
      sample = llava_sample({"conversations": conversations}, index, "")
      return Sample(key, sample.turns, images, **extra)
    if "question" not in record or not ("answer" in record or extra["answers"]):
      raise BadSample("format", f"needs 'conversations' or 'question' + 'answer' (or 'answers'), has {sorted(record)}")
    question = text(record["question"])
    if images and IMAGE not in question:
      question = IMAGE + "\n" + question
    answer = [("assistant", text(record["answer"]))] if "answer" in record else []
    return Sample(key, [("user", question)] + answer, images, **extra)


@dataclasses.dataclass(frozen=True)
class Options:
  """What sources need besides their spec."""

  seed: int = 0
  image_size: int = 64
  image_position: str = "before"
  tfds_dir: str = ""


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'a=0.7,b=0.3' -> [('a', 0.7), ('b', 0.3)]; a spec without '=W' has weight 1."""
  out = []
  for part in spec.split(","):
    part = part.strip()
    head, eq, weight = part.rpartition("=")
    if eq:
      try:
        w = float(weight)
      except ValueError:
        raise UserError(f"data spec {spec!r}: weight {weight!r} of {head!r} is not a number") from None
      if not (w > 0 and np.isfinite(w)):
        raise UserError(f"data spec {spec!r}: weight of {head!r} must be positive, got {weight}")
      out.append((head, w))
    elif part:
      out.append((part, 1.0))
  if not out:
    raise UserError(f"data spec {spec!r}: no source")
  return out


def open_source(spec: str, options: Options) -> Source:
  """One source from its spec."""
  kind, _, rest = spec.partition(":")
  if kind == "shapes":
    return ShapesSource(
      rest or "train", seed=options.seed, image_size=options.image_size, image_position=options.image_position
    )
  if kind == "llava" and rest:
    path, _, root = rest.partition(":")
    return LlavaSource(path, root)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    return TfdsSource(name, split or "train", options.tfds_dir)
  raise UserError(
    f"data spec {spec!r}: unknown source (expected shapes[:SPLIT], "
    "llava:JSON_OR_JSONL[:IMAGE_ROOT], tfds:NAME[/CONFIG][:SPLIT], or SPEC=W,SPEC=W)"
  )


def open_mixture(spec: str, options: Options) -> tuple[list[Source], list[float]]:
  """Sources and normalised weights of a (possibly one-source) mixture spec."""
  parsed = parse_mixture(spec)
  sources = [open_source(s, options) for s, _ in parsed]
  for source in sources:
    if len(source) == 0:
      raise UserError(f"data spec {source.name!r}: no samples")
  total = sum(w for _, w in parsed)
  return sources, [w / total for _, w in parsed]
