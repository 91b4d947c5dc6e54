"""tfds: sources through tfds.data_source, on a tiny array_record dataset built here (no TensorFlow)."""

import io
import json

import numpy as np
import PIL.Image
import pytest

import helpers

from vlm_jax.data import IMAGE, images
from vlm_jax.data.pipeline import Batches
from vlm_jax.data.prepare import Skipped, decode_image
from vlm_jax.data.sources import Options
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.eval import examples

tfds = pytest.importorskip("tensorflow_datasets")

SIZE = 16


def _pixels(i: int) -> np.ndarray:
  return np.full((SIZE + 4, SIZE, 3), 10 * i, np.uint8)


def _png(pixels: np.ndarray) -> bytes:
  """Encoded here: tfds encodes arrays with TensorFlow, but passes encoded bytes through."""
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


class TinyVqa(tfds.core.GeneratorBasedBuilder):
  """Six samples: VQA-style question/answer with an image, LLaVA conversations, one broken."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(SIZE + 4, SIZE, 3)),
          "question": tfds.features.Text(),
          "answer": tfds.features.Text(),
          "conversations": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      conversations = (
        ""
        if i < 3
        else json.dumps([{"from": "human", "value": f"{IMAGE}\nWhat is it?"}, {"from": "gpt", "value": f"thing {i}"}])
      )
      if i == 5:
        conversations = "{broken"
      yield (
        i,
        {
          "id": f"s{i}",
          "image": _png(_pixels(i)),
          "question": f"Colour {i}?",
          "answer": f"grey {i}",
          "conversations": conversations,
        },
      )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  TinyVqa(data_dir=directory, file_format="array_record").download_and_prepare()
  return directory


def test_tfds_source_through_the_pipeline(data_dir):
  tok = Tokenizer.load("shapes")
  config = helpers.data_config(
    "tfds:tiny_vqa:train", seq_len=64, batch=1, seed=0, tfds_dir=data_dir, threads=0, prefetch=0
  )
  it = Batches(config, tok, 2, preprocessing=images.Preprocessing(SIZE))
  prepared = [it.prepare((0, i)) for i in range(6)]  # tfds orders records by a hash of their keys
  broken = [p for p in prepared if isinstance(p, Skipped)]
  assert sorted(p.key for p in prepared if not isinstance(p, Skipped)) == [f"s{i}" for i in range(5)]
  assert len(broken) == 1 and broken[0].reason == "format" and "tfds:tiny_vqa:train sample" in broken[0].message
  seen = {}
  for _ in range(5):
    b = next(it)
    ((key,),) = b["keys"]
    seen[key] = b
  assert sorted(seen) == [f"s{i}" for i in range(5)] and it.skipped == {"format": 1}
  for key, b in seen.items():
    i = int(key[1:])
    np.testing.assert_array_equal(b["images"][0, 0], images.Preprocessing(SIZE)(_pixels(i)))
    answer = f"grey {i}" if i < 3 else f"thing {i}"
    assert tok.decode(b["targets"][0][b["loss_mask"][0] == 1]) == f" {answer}"
    assert (b["tokens"][0] == tok.image_id).sum() == 2


def test_unknown_tfds_dataset(tmp_path):
  with pytest.raises(UserError, match="tfds:nope:train"):
    Batches(
      helpers.data_config("tfds:nope", seq_len=64, batch=1, seed=0, tfds_dir=str(tmp_path)),
      Tokenizer.load("shapes"),
      2,
      preprocessing=images.Preprocessing(SIZE),
    )


class TinyVqaAnswers(tfds.core.GeneratorBasedBuilder):
  """Three VQA-style eval samples: a question, the annotators' answers, a category; no answer turn."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(SIZE + 4, SIZE, 3)),
          "question": tfds.features.Text(),
          "answers": tfds.features.Sequence(tfds.features.Text()),
          "category": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield (
        i,
        {
          "id": f"v{i}",
          "image": _png(_pixels(i)),
          "question": f"Colour {i}?",
          "answers": [f"grey {i}"] * 9 + ["black"],
          "category": ["a", "b", "a"][i],
        },
      )


def test_tfds_eval_samples_carry_answer_lists(tmp_path):
  TinyVqaAnswers(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  read, skipped = examples.read("tfds:tiny_vqa_answers:validation", Options(tfds_dir=str(tmp_path)))
  assert len(read) == 3 and not skipped
  for e in read:
    i = int(e.key[1:])
    assert e.prompt == f"{IMAGE}\nColour {i}?" and e.turns == () and e.history == ()
    assert e.reference.answers == (f"grey {i}",) * 9 + ("black",) and e.category == ["a", "b", "a"][i]
    np.testing.assert_array_equal(decode_image(e.images[0]), _pixels(i))
