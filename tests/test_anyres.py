"""AnyRes: plans, tiles and token counts against transformers' LLaVA-NeXT / OneVision processors,
the merged visual sequence against LlavaNextForConditionalGeneration, static shapes in training,
and bad input."""

import tempfile

import numpy as np
import pytest
import transformers
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil)

import hf_models
from vlm_jax.data import anyres
from vlm_jax.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT = anyres.Spec(tile=336, side=24, pinpoints=anyres.parse_pinpoints(str(NEXT_PINPOINTS), 336))
ONEVISION = anyres.Spec(tile=384, side=27, pinpoints=anyres.parse_pinpoints("(1x1),...,(6x6)", 384), max_n=9)

# (H, W): every pinpoint exactly, a tile, ties (squares, tiny), extreme aspect ratios, tiny
# images, odd and large sizes, and the worked examples of the reference notes.
SIZES = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008), (336, 336), (672, 1344),
         (2, 2), (3, 5), (7, 3), (10, 10), (16, 40), (100, 100), (224, 224),
         (40, 2000), (2000, 40), (60, 4000), (4000, 60), (300, 3000), (3000, 300),
         (600, 1000), (1000, 600), (480, 640), (640, 480), (1000, 1000), (2000, 500), (500, 2000),
         (1080, 1920), (1920, 1080), (599, 1001), (337, 673), (335, 671), (768, 1024), (3000, 4000)]


def _tokenizer():
  d = tempfile.mkdtemp()
  hf_models.save_tokenizer(d)
  return transformers.PreTrainedTokenizerFast.from_pretrained(d)


@pytest.fixture(scope="module")
def next_processor():
  ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                  image_grid_pinpoints=NEXT_PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD)
  return transformers.LlavaNextProcessor(image_processor=ip, tokenizer=_tokenizer(), patch_size=14,
                                         vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1, image_token="<image>")


@pytest.fixture(scope="module")
def onevision_processor():
  """LlavaOnevisionProcessor without its video processor (which needs torchvision): we call its
  token count and its image processor, the two parts __call__ uses for an image."""
  proc = transformers.LlavaOnevisionProcessor.__new__(transformers.LlavaOnevisionProcessor)
  proc.image_processor = LlavaOnevisionImageProcessorPil(image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  proc.num_image_tokens, proc.vision_aspect_ratio = 729, "anyres_max_9"
  return proc


def _image(size, seed=0):
  return np.random.default_rng([seed, *size]).integers(0, 256, size + (3,), dtype=np.uint8)


def _hf(processor, image):
  """(image tokens, pixel tiles [n, H, W, 3]) from a transformers processor."""
  # channels_last: a 3-pixel side would otherwise be taken for the channel axis
  out = processor(images=[image], text=["<image> what"], return_tensors="np", input_data_format="channels_last")
  n = int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
  return n, out["pixel_values"][0].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", SIZES)
def test_next_matches_transformers(size, next_processor):
  image = _image(size)
  plan = anyres.plan(size, NEXT)
  n, pixels = _hf(next_processor, image)
  assert plan.tokens == n
  ours = anyres.tiles(image, plan, NEXT, CLIP_MEAN, CLIP_STD)
  assert ours.shape == pixels.shape  # base view + rows x cols tiles
  assert plan.grid[0] * plan.grid[1] + 1 == len(pixels)
  np.testing.assert_allclose(ours, pixels, atol=1e-5)


@pytest.mark.parametrize("size", [(600, 1000), (1080, 1920), (3000, 4000), (384, 384), (20, 2000),
                                  (2000, 20), (777, 777), (400, 3000), (1536, 768)])
def test_onevision_matches_transformers(size, onevision_processor):
  image = _image(size)
  plan = anyres.plan(size, ONEVISION)
  assert plan.tokens == onevision_processor._get_number_of_features(*size, 384, 384)
  pixels = onevision_processor.image_processor(
      [image], return_tensors="np", input_data_format="channels_last")["pixel_values"][0].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(anyres.tiles(image, plan, ONEVISION, (0.5,) * 3, (0.5,) * 3), pixels, atol=1e-5)


@pytest.mark.parametrize("size,tokens", [((600, 1000), 1948), ((1000, 600), 1968), ((480, 640), 2340),
                                         ((1000, 1000), 2928), ((2000, 500), 1944), ((336, 336), 1176)])
def test_next_worked_examples(size, tokens):
  assert anyres.plan(size, NEXT).tokens == tokens


def test_onevision_worked_examples():
  assert anyres.plan((600, 1000), ONEVISION).features == (48, 81)
  assert anyres.plan((1080, 1920), ONEVISION).features == (60, 108)
  assert [anyres.plan(s, ONEVISION).tokens for s in ((600, 1000), (1080, 1920), (3000, 4000))] == [4665, 7269, 7309]


def test_tie_goes_to_the_first_pinpoint_in_h_w():
  # 336x336 fits 1x2 and 2x1 equally: transformers (and we) take the first, read as (H, W).
  assert anyres.plan((336, 336), NEXT).grid == (1, 2)


def test_pinpoint_formats_agree():
  assert anyres.parse_pinpoints("(1x2),(2x1),(2x2),(3x1),(1x3)", 336) == NEXT.pinpoints
  assert anyres.parse_pinpoints("(1x1),...,(2x3)", 10) == ((10, 10), (10, 20), (10, 30), (20, 10), (20, 20), (20, 30))


@pytest.mark.parametrize("size", [(0, 100), (100, 0), (1, 500), (500, 1), (1, 1)])
def test_degenerate_images_are_errors(size):
  with pytest.raises(UserError, match=r"at least 2 pixels"):
    anyres.plan(size, NEXT)


@pytest.mark.parametrize("size", [(2, 5000), (5000, 2), (20, 2000)])
def test_images_too_thin_for_the_grid_are_errors(size):
  # transformers fails on the first two (no pinpoint) and silently keeps no tile feature of the third.
  with pytest.raises(UserError, match=r"too thin|no feature row"):
    anyres.plan(size, NEXT)


@pytest.mark.parametrize("text", ["[[300, 672]]", "[]", "[[336]]", "hello", "(0x1)"])
def test_bad_grids_are_errors(text):
  with pytest.raises(UserError, match="grid_pinpoints"):
    anyres.parse_pinpoints(text, 336)
