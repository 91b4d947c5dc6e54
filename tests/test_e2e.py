"""The README's main job, end to end: train the default config through the CLI, check it learned
from the image (held-out accuracy, shuffled-image control), and ask it about a new image. One
`vlm_jax.load` of the trained model answers the prompts, `vlm-jax eval` runs in this process, and
one `vlm-jax generate --json` process checks the command line's contract."""

import json
import os
import time

import PIL.Image
import pytest

import vlm_jax
from processes import cli_here, vlm_jax_cli
from test_eval import WRONG, write_eval_set
from vlm_jax.data import shapes
from vlm_jax.data.images import load_image
from vlm_jax.eval import metrics
from vlm_jax.data.shapes import Shape, draw_shapes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("shapes"))
  t0 = time.time()
  vlm_jax_cli("train", "--config", "configs/shapes_tiny.py", "--workdir", workdir)
  print(f"\ntrain took {time.time() - t0:.0f}s")
  return workdir


@pytest.fixture(scope="module")
def model(trained):
  return vlm_jax.load(trained)


def vlm_jax_here(capsys, *args: str) -> dict:
  """`vlm-jax ARGS --json` in this process (its 8 CPU devices): the JSON object it printed."""
  result = cli_here(capsys, *args, "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def test_default_config_learns_from_the_image(trained, capsys):
  lines = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
  final = [l for l in lines if "eval/shapes_test/accuracy" in l][-1]
  print("held-out:", {k: round(v, 3) for k, v in final.items()})
  assert any("train/tokens_per_s" in l for l in lines)
  assert os.listdir(os.path.join(trained, "tensorboard"))
  # Counting needs the image and no binding of words to objects: learned near-perfectly.
  assert final["eval/shapes_test/accuracy/count"] >= 0.9
  # Overall accuracy is far above what the same model scores with the images shuffled.
  shuffled = vlm_jax_here(
    capsys, "eval", "--checkpoint", trained, "--data", "shapes:test", "--max-examples", "256", "--shuffle-images"
  )
  print("shuffled images:", shuffled)
  assert shuffled["examples"] == 256
  assert final["eval/shapes_test/accuracy"] >= 0.9  # the foundation issue's acceptance bar
  assert final["eval/shapes_test/accuracy"] >= shuffled["accuracy"] + 0.4
  assert shuffled["accuracy/count"] <= 0.6


# Layouts of the held-out split (shapes._is_held_out): training never draws these images.
TWO = [Shape("circle", "green", 8, 8, 12), Shape("triangle", "orange", 40, 24, 12)]
ONE = [Shape("square", "purple", 24, 40, 12)]
THREE = [Shape("circle", "yellow", 8, 8, 12), Shape("square", "red", 24, 8, 12), Shape("triangle", "blue", 8, 24, 12)]


@pytest.mark.parametrize(
  "objects,prompt,answer",
  [
    (THREE, "How many shapes are there?", "three"),
    (ONE, "How many shapes are there?", "one"),
    (TWO, "How many shapes are there?", "two"),
    (ONE, "What shape is purple?", "square"),
    (THREE, "What color is the circle?", "yellow"),
    (TWO, "What color is the triangle?", "orange"),
    (ONE, "Which side is the square on?", "left"),
  ],
)
def test_generate_answers_about_a_new_image(model, tmp_path, objects, prompt, answer):
  assert shapes._is_held_out(objects, "dark")  # not an image the model was trained on
  path = str(tmp_path / "drawn.png")
  PIL.Image.fromarray(draw_shapes(objects, 64, "dark")).save(path)
  image = load_image(path)  # as `vlm-jax generate --image` reads it
  assert model.generate([image], [prompt])[0] == answer
  assert model.image_tokens_for(image) == 16 and len(model.encode_prompt(prompt, image=[image])) > 16


def test_generate_cli_prints_the_answer_as_json(trained, tmp_path):
  """The command line's contract, in a process of its own: one JSON object on stdout."""
  objects, prompt, answer = THREE, "How many shapes are there?", "three"
  path = str(tmp_path / "drawn.png")
  PIL.Image.fromarray(draw_shapes(objects, 64, "dark")).save(path)
  out = json.loads(
    vlm_jax_cli("generate", "--checkpoint", trained, "--image", path, "--prompt", prompt, "--json").stdout
  )
  assert out["text"] == answer, out
  assert out["image_tokens"] == 16 and out["prompt_tokens"] > 16


def test_eval_scores_a_vqa_file(trained, tmp_path, capsys):
  """`vlm-jax eval` on 30 VQA-style samples (ten annotator answers each): the --json score is the
  mean of the --predictions lines' scores, recomputed here; the trained model scores near an
  oracle that always gives the right answer."""
  path = write_eval_set(str(tmp_path), 30, varied=False)
  predictions = tmp_path / "predictions.jsonl"
  out = vlm_jax_here(
    capsys,
    "eval",
    "--checkpoint",
    trained,
    "--data",
    f"llava:{path}",
    "--metric",
    "vqa",
    "--predictions",
    str(predictions),
  )
  lines = [json.loads(l) for l in open(predictions)]
  scores = [metrics.vqa_accuracy(l["prediction"], l["answers"]) for l in lines]
  print("vqa:", out)
  assert out["examples"] == len(lines) == 30 and out["metric"] == "vqa"
  assert [l["score"] for l in lines] == scores
  assert out["accuracy"] == pytest.approx(sum(scores) / 30)
  oracle = [metrics.vqa_accuracy(l["answers"][0], l["answers"]) if l["answers"][0] != WRONG else 0.0 for l in lines]
  assert out["accuracy"] >= 0.8 * sum(oracle) / 30
