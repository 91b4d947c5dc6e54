"""Parity on real inputs: LLaVA checkpoints written by transformers itself (model, processor and
tokenizer through save_pretrained) give transformers' pixel inputs, prompt ids and greedy tokens
through vlm_jax.load and `vlm-jax generate`, for each image processor kind LLaVA checkpoints ship
with, on images of every aspect ratio; export writes a processor that does what we do."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers

import hf_models
import vlm_jax
from vlm_jax import cli
from vlm_jax.convert import hf_export
from vlm_jax.data.images import Preprocessing
from vlm_jax.errors import UserError

NEW_TOKENS = hf_models.NEW_TOKENS
# (H, W): portrait, landscape, square, 1:10 strip, 10:1 strip; AnyRes also one too elongated for
# any grid (no feature row survives unpadding: the base view alone).
SIZES = [(40, 24), (24, 40), (30, 30), (12, 120), (120, 12)]
NEXT_SIZES = [(90, 50), (50, 90), (64, 64), (12, 120), (120, 12), (3, 300)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for kind in hf_models.KINDS:
    d = str(tmp_path_factory.mktemp(kind))
    model = hf_models.write_llava(d, kind)
    out[kind] = {"dir": d, "hf": model, "processor": transformers.AutoProcessor.from_pretrained(d, backend="pil")}
  return out


def _our_pixels(model, image) -> np.ndarray:
  """[tiles, H, W, 3]: what our ViT gets for the image (uint8 from the host, normalised on device)."""
  pixels = model.anyres.prepare(image).tiles if model.anyres else model.preprocess(image)[None]
  assert pixels.dtype == np.uint8  # data.images_uint8, the default
  return np.asarray(model.run.model.apply({"params": model.params}, pixels, method="pixels"))


def _their_pixels(processor, image) -> np.ndarray:
  pixels = processor.image_processor([image], return_tensors="np")["pixel_values"][0]
  return (pixels if pixels.ndim == 4 else pixels[None]).transpose(0, 2, 3, 1)


def _sizes(kind: str):
  return NEXT_SIZES if kind == "next" else SIZES


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_pixels_prompt_ids_and_greedy_tokens_equal_transformers(kind, checkpoints, tmp_path, capsys):
  c = checkpoints[kind]
  ours = vlm_jax.load(c["dir"], dtype="float32")
  expected_mode = {"clip_crop": "shortest_edge_crop", "llava_pad": "pad_square"}.get(kind, "squash")
  assert ours.config.data.image_resize == expected_mode
  lengths = []
  for i, size in enumerate(_sizes(kind)):
    image = hf_models.image(size, seed=i)
    inputs = hf_models.hf_inputs(c["processor"], image)
    # Pixels: the processor's pixel_values, every tile (fp32).
    mine, theirs = _our_pixels(ours, image), _their_pixels(c["processor"], image)
    assert mine.shape == theirs.shape, size
    np.testing.assert_allclose(mine, theirs, atol=1e-5, err_msg=str(size))
    # Prompt ids: template, BOS and image-token expansion.
    assert ours.encode_prompt(hf_models.QUESTION, image=image).tolist() == inputs["input_ids"][0].tolist(), size
    # Greedy tokens, through the Python API and the CLI (from the image saved as a file).
    expected = hf_models.hf_greedy(c["hf"], inputs)
    lengths.append(len(expected))
    assert ours.generate_ids([image], [hf_models.QUESTION], max_new_tokens=NEW_TOKENS) == [expected], size
    path = str(tmp_path / f"{kind}_{i}.png")
    image.save(path)
    assert (
      cli.main(
        [
          "generate",
          "--checkpoint",
          c["dir"],
          "--image",
          path,
          "--prompt",
          hf_models.QUESTION,
          "--max-new-tokens",
          str(NEW_TOKENS),
          "--json",
        ]
      )
      == 0
    )
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected, size
  assert max(lengths) == NEW_TOKENS  # the comparison covers whole answers, not an early EOS
  # Logits at every position (greedy tokens alone can agree while logits do not).
  inputs = hf_models.hf_inputs(c["processor"], image)
  with torch.no_grad():
    theirs = c["hf"](**inputs).logits[0].numpy()
  ids = inputs["input_ids"].numpy().astype(np.int32)
  positions = np.arange(ids.shape[1])[None]
  mine = ours.run.model.apply({"params": ours.params}, ids, ours.pixels([image]), positions, np.ones_like(positions))
  np.testing.assert_allclose(np.asarray(mine)[0], theirs, atol=1e-4)
  # Greedy with transformers' repetition penalty (over the prompt's ids and the answer's).
  image = hf_models.image(_sizes(kind)[0])
  expected = hf_models.hf_greedy(c["hf"], hf_models.hf_inputs(c["processor"], image), repetition_penalty=4.0)
  assert expected != hf_models.hf_greedy(
    c["hf"], hf_models.hf_inputs(c["processor"], image)
  )  # the penalty changes the answer
  assert ours.generate_ids([image], [hf_models.QUESTION], max_new_tokens=NEW_TOKENS, repetition_penalty=4.0) == [
    expected
  ]


@pytest.mark.parametrize("bos", ["added", "not_added", "none", "template"])
def test_prompt_ids_follow_the_tokenizers_bos_rule(bos, tmp_path):
  """BOS as the tokenizer adds it, raw and templated; a template that writes {{ bos_token }}
  gets it once."""
  chat = "{{ bos_token }}" + hf_models.CHAT if bos == "template" else hf_models.CHAT
  d = str(tmp_path / bos)
  hf_models.write_llava(d, "siglip", bos="added" if bos == "template" else bos, chat=chat)
  processor = transformers.AutoProcessor.from_pretrained(d, backend="pil")
  ours = vlm_jax.load(d, dtype="float32")
  image = hf_models.image((24, 40))
  raw = "USER: <image> what color is the circle ASSISTANT:"
  theirs_raw = hf_models.hf_inputs(processor, image, raw, raw=True)["input_ids"][0].tolist()
  theirs = hf_models.hf_inputs(processor, image)["input_ids"][0].tolist()
  assert ours.encode_prompt(raw, raw_prompt=True, image=image).tolist() == theirs_raw
  assert ours.encode_prompt(hf_models.QUESTION, image=image).tolist() == theirs
  bos_id = processor.tokenizer.bos_token_id
  starts_with_bos = {"added": True, "not_added": False, "none": False, "template": True}[bos]
  assert (theirs[0] == bos_id) == starts_with_bos and theirs.count(bos_id) == int(starts_with_bos)
  assert (theirs_raw[0] == bos_id) == (bos in ("added", "template"))


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_export_of_an_imported_checkpoint_gives_our_pixels(kind, checkpoints, tmp_path):
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  assert cli.main(["convert", "--from-hf", checkpoints[kind]["dir"], "--out", work]) == 0
  assert cli.main(["convert", "--checkpoint", work, "--to-hf", out]) == 0
  ours = vlm_jax.load(work)
  processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
  for i, size in enumerate(_sizes(kind)):
    image = hf_models.image(size, seed=i)
    np.testing.assert_allclose(_our_pixels(ours, image), _their_pixels(processor, image), atol=1e-5, err_msg=str(size))


@pytest.mark.parametrize("resize,short_side", [("pad_square", 0), ("shortest_edge_crop", 20), ("squash", 0)])
def test_export_writes_a_changed_resize_mode(resize, short_side, checkpoints, tmp_path):
  """A model imported with one processor and trained with another exports the one it used."""
  ours = vlm_jax.load(checkpoints["siglip"]["dir"])
  ours.config.data.update(
    dict(image_resize=resize, image_short_side=short_side, image_mean=hf_models.CLIP_MEAN, image_std=hf_models.CLIP_STD)
  )
  out = str(tmp_path / "out")
  hf_export.export(ours.config, ours.tokenizer, ours.params, ours.origin, out)
  processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
  pre = Preprocessing.from_config(ours.config)
  for i, size in enumerate(SIZES):
    image = hf_models.image(size, seed=i)
    on_host = dataclasses.replace(pre, on_device=False)  # the float path, with the changed mean and std
    np.testing.assert_allclose(on_host(image)[None], _their_pixels(processor, image), atol=1e-5, err_msg=str(size))
  # And it imports back to the same settings.
  again = vlm_jax.load(out)
  assert Preprocessing.from_config(again.config) == pre


def test_unsupported_processor_settings_are_said_in_one_line(checkpoints, tmp_path, caplog):
  d = str(tmp_path / "odd")
  hf_models.write_llava(d, "siglip")
  path = os.path.join(d, "processor_config.json")
  hf_models.edit_json(path, **{"image_processor.image_processor_type": "Idefics3ImageProcessor"})
  with caplog.at_level(logging.WARNING, logger="vlm_jax"):
    vlm_jax.load(d)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "Idefics3ImageProcessor is not an image processor vlm-jax reproduces" in warnings[0]
  assert "\n" not in warnings[0]
  hf_models.edit_json(
    path,
    **{
      "image_processor.image_processor_type": "CLIPImageProcessor",
      "image_processor.do_center_crop": True,
      "image_processor.crop_size": {"height": 12, "width": 12},
    },
  )
  with pytest.raises(UserError, match=r"processor_config.json: crop_size .* is not the vision tower's image_size 16"):
    vlm_jax.load(d)
