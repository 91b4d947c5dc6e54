"""A LLaVA-format set on disk (JPEG files + JSON) made from `shapes`: for tests, the loader
benchmark, and trying the llava: source without a download.

`python -m vlm_jax.data.llava_fixture DIR [N]` writes DIR/data.json and DIR/images/.
"""

import json
import os
import sys

import PIL.Image

from vlm_jax.data import shapes
from vlm_jax.data import IMAGE

SPEAKERS = {"user": "human", "assistant": "gpt"}

# One of each kind of bad sample, with the reason the pipeline gives it.
BROKEN = {
  "missing_image": "image",
  "corrupt_image": "image",
  "no_placeholder": "image_count",
  "extra_placeholder": "image_count",
  "unknown_role": "role",
  "empty_turn": "empty",
  "too_long": "too_long",
}


def _conversation(turns: list[tuple[str, str]]) -> list[dict]:
  return [{"from": SPEAKERS[role], "value": text} for role, text in turns]


def write(
  directory: str,
  n: int,
  *,
  seed: int = 0,
  image_size: int = 64,
  jpeg_size: tuple[int, int] | None = None,
  text_only_every: int = 5,
  broken: bool = True,
  jsonl: bool = False,
) -> str:
  """Writes n good samples (every `text_only_every`-th without an image, multi-turn) and, with
  `broken`, one sample of each BROKEN kind (id = the kind); returns the JSON(L) path.
  `jpeg_size` (width, height) resizes the saved images (e.g. 640x480, for the benchmark)."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  records = []
  for i in range(n):
    ex = shapes.make_example(seed, "train", i, image_size)
    if text_only_every and i % text_only_every == text_only_every - 1:
      turns = [(role, text.replace(IMAGE + "\n", "")) for role, text in ex.turns]
      records.append({"id": f"text{i}", "conversations": _conversation(turns)})
      continue
    name = f"images/{i:06d}.jpg"
    image = PIL.Image.fromarray(ex.image)
    if jpeg_size:
      image = image.resize(jpeg_size, PIL.Image.Resampling.BILINEAR)
    image.save(os.path.join(directory, name), quality=90)
    records.append({"id": f"img{i}", "image": name, "conversations": _conversation(ex.turns)})
  if broken:
    with open(os.path.join(directory, "images", "corrupt.jpg"), "wb") as f:
      f.write(b"not a jpeg")
    qa = [("user", f"{IMAGE}\nWhat is it?"), ("assistant", "a square")]
    bad = {
      "missing_image": dict(image="images/missing.jpg", conversations=_conversation(qa)),
      "corrupt_image": dict(image="images/corrupt.jpg", conversations=_conversation(qa)),
      "no_placeholder": dict(image="images/000000.jpg", conversations=_conversation([("user", "What is it?"), qa[1]])),
      "extra_placeholder": dict(
        image="images/000000.jpg", conversations=_conversation([("user", f"{IMAGE} {IMAGE} What?"), qa[1]])
      ),
      "unknown_role": dict(conversations=[{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]),
      "empty_turn": dict(conversations=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]),
      "too_long": dict(conversations=_conversation([("user", "tell me " * 400), ("assistant", "no")])),
    }
    step = max(n // len(bad), 1)
    for j, (key, record) in enumerate(bad.items()):
      records.insert(min(j * step + 1, len(records)), {"id": key, **record})
  path = os.path.join(directory, "data.jsonl" if jsonl else "data.json")
  with open(path, "w") as f:
    if jsonl:
      f.writelines(json.dumps(r) + "\n" for r in records)
    else:
      json.dump(records, f)
  return path


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit("usage: python -m vlm_jax.data.llava_fixture DIR [N]")
  print(write(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 100))
