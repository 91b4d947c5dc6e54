"""AnyRes: plans, tiles and token counts against transformers' LLaVA-NeXT / OneVision processors,
the merged visual sequence against LlavaNextForConditionalGeneration, static shapes in training,
and bad input."""

import json
import os
import tempfile
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

import helpers
import hf_models
import vlm_jax
from vlm_jax import build as build_lib
from vlm_jax import cli, parallel, tasks
from vlm_jax import config as config_lib
from vlm_jax.convert import hf_export
from vlm_jax.convert.safetensors_io import read_all
from vlm_jax.data import IMAGE, anyres
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.packing import TileGroups, collate_text
from vlm_jax.data.pipeline import Batches, device_batch
from vlm_jax.data.sources import Sample
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import BadSample, UserError
from vlm_jax.models.vlm import VLM
from vlm_jax.train import loop
from vlm_jax.train import trainer as trainer_lib

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT = anyres.Spec(tile=336, side=24, pinpoints=anyres.parse_pinpoints(str(NEXT_PINPOINTS), 336))
ONEVISION = anyres.Spec(tile=384, side=27, pinpoints=anyres.parse_pinpoints("(1x1),...,(6x6)", 384), max_n=9)

# (H, W): every pinpoint exactly, a tile, ties (squares, tiny), extreme aspect ratios, tiny
# images, odd and large sizes, and the worked examples of the reference notes.
SIZES = [
  (336, 672),
  (672, 336),
  (672, 672),
  (1008, 336),
  (336, 1008),
  (336, 336),
  (672, 1344),
  (2, 2),
  (3, 5),
  (7, 3),
  (10, 10),
  (16, 40),
  (100, 100),
  (224, 224),
  (40, 2000),
  (2000, 40),
  (60, 4000),
  (4000, 60),
  (300, 3000),
  (3000, 300),
  (600, 1000),
  (1000, 600),
  (480, 640),
  (640, 480),
  (1000, 1000),
  (2000, 500),
  (500, 2000),
  (1080, 1920),
  (1920, 1080),
  (599, 1001),
  (337, 673),
  (335, 671),
  (768, 1024),
  (3000, 4000),
  # too elongated for any grid: no feature row (or column) survives unpadding
  (20, 2000),
  (2000, 20),
  (2, 5000),
  (5000, 2),
  (1, 500),
  (500, 1),
  (1, 1),
  (9, 3000),
]


def _tokenizer():
  d = tempfile.mkdtemp()
  hf_models.save_tokenizer(d)
  return transformers.PreTrainedTokenizerFast.from_pretrained(d)


@pytest.fixture(scope="module")
def next_processor():
  ip = LlavaNextImageProcessorPil(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_grid_pinpoints=NEXT_PINPOINTS,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
  )
  return transformers.LlavaNextProcessor(
    image_processor=ip,
    tokenizer=_tokenizer(),
    patch_size=14,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    image_token="<image>",
  )


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
  ours = anyres.tiles(image, plan, NEXT, Preprocessing(336, mean=CLIP_MEAN, std=CLIP_STD))
  assert ours.shape == pixels.shape  # base view + rows x cols tiles
  assert plan.grid[0] * plan.grid[1] + 1 == len(pixels)
  np.testing.assert_allclose(ours, pixels, atol=1e-5)


@pytest.mark.parametrize(
  "size",
  [(600, 1000), (1080, 1920), (3000, 4000), (384, 384), (20, 2000), (2000, 20), (777, 777), (400, 3000), (1536, 768)],
)
def test_onevision_matches_transformers(size, onevision_processor):
  image = _image(size)
  plan = anyres.plan(size, ONEVISION)
  assert plan.tokens == onevision_processor._get_number_of_features(*size, 384, 384)
  pixels = onevision_processor.image_processor([image], return_tensors="np", input_data_format="channels_last")[
    "pixel_values"
  ][0].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(anyres.tiles(image, plan, ONEVISION, Preprocessing(384)), pixels, atol=1e-5)


@pytest.mark.parametrize(
  "size,tokens",
  [
    ((600, 1000), 1948),
    ((1000, 600), 1968),
    ((480, 640), 2340),
    ((1000, 1000), 2928),
    ((2000, 500), 1944),
    ((336, 336), 1176),
  ],
)
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


@pytest.mark.parametrize("size", [(0, 100), (100, 0), (0, 0)])
def test_empty_images_are_errors(size):
  with pytest.raises(UserError, match=r"at least 1 pixel"):
    anyres.plan(size, NEXT)


@pytest.mark.parametrize("size", [(20, 2000), (2, 5000), (2000, 20), (5000, 2)])
def test_images_too_elongated_for_any_grid_keep_the_base_view(size):
  # As transformers (test_next_matches_transformers has these sizes too): a wide strip keeps no
  # feature row of its grid, a tall one keeps its rows at zero width, each ended by the newline.
  plan = anyres.plan(size, NEXT)
  rows = plan.grid[0] * 24
  assert plan.features == ((0, plan.grid[1] * 24) if size[1] > size[0] else (rows, 0))
  tokens = 576 + plan.features[0]
  assert plan.tokens == tokens and plan.tiles == plan.grid[0] * plan.grid[1] + 1
  index, weight = anyres.token_sources(plan, NEXT)
  assert index.shape == (tokens, 1) and (index[576:] == anyres.NEWLINE).all() and (weight == 1).all()
  # Without a base view such an image would have no tokens at all: that is an error.
  with pytest.raises(UserError, match="no feature row survives"):
    anyres.plan((20, 2000), anyres.Spec(tile=336, side=24, pinpoints=NEXT.pinpoints, base_view=False))


@pytest.mark.parametrize("text", ["[[300, 672]]", "[]", "[[336]]", "hello", "(0x1)"])
def test_bad_grids_are_errors(text):
  with pytest.raises(UserError, match="grid_pinpoints"):
    anyres.parse_pinpoints(text, 336)


# --- The model side: merged visual sequence and logits against LlavaNextForConditionalGeneration ---
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's, at a 32-px tile
TINY_SIZES = [
  (20, 50),
  (50, 20),
  (32, 32),
  (100, 30),
  (9, 90),
  (64, 64),
  (45, 77),
  (2, 2),
  (70, 10),
  (3, 300),
  (300, 3),
]  # the last two: no feature row / zero-width rows after unpadding


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
  """A random LlavaNextForConditionalGeneration (CLIP tiles of 32 px, 4x4 patches) saved with its
  tokenizer and image processor."""
  d = str(tmp_path_factory.mktemp("llava_next"))
  tok = hf_models.save_tokenizer(d)
  config = transformers.LlavaNextConfig(
    vision_config=transformers.CLIPVisionConfig(**{**hf_models.VISION_KW, "image_size": 32}),
    text_config=hf_models.text_config("llama", 64),
    image_token_id=tok.token_to_id("<image>"),
    image_grid_pinpoints=TINY_PINPOINTS,
  )
  model = hf_models.randomize(transformers.LlavaNextForConditionalGeneration(config), seed=3)
  model.config._attn_implementation = "eager"
  model.save_pretrained(d)
  LlavaNextImageProcessorPil(
    size={"shortest_edge": 32},
    crop_size={"height": 32, "width": 32},
    image_grid_pinpoints=TINY_PINPOINTS,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
  ).save_pretrained(d)
  processor = transformers.LlavaNextProcessor(
    image_processor=transformers.AutoImageProcessor.from_pretrained(d, backend="pil"),
    tokenizer=transformers.PreTrainedTokenizerFast.from_pretrained(d),
    patch_size=8,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    image_token="<image>",
  )
  return {"dir": d, "hf": model, "processor": processor}


def _hf_inputs(processor, image):
  return processor(
    images=[image], text=["USER: <image> what color"], return_tensors="pt", input_data_format="channels_last"
  )


def _vit_input(ours, tiles: np.ndarray) -> np.ndarray:
  """The ViT's input the model makes of our tiles (uint8 pixels are normalised on device)."""
  assert tiles.dtype == np.uint8  # data.images_uint8, the default
  return np.asarray(ours.run.model.apply({"params": ours.params}, tiles, method="pixels"))


def test_merged_visual_sequence_and_logits_match_transformers(tiny_next):
  ours = vlm_jax.load(tiny_next["dir"], dtype="float32")
  assert ours.config.model.anyres.enabled and ours.anyres.spec.side == 4
  images = [_image(s, seed=5) for s in TINY_SIZES]
  tiled = [ours.anyres.prepare(im) for im in images]
  # All images in one tile pool (one group), as a training batch packs them.
  batch = ours.anyres.collate(
    [[t] for t in tiled],
    groups=1,
    tiles_per_group=sum(t.plan.tiles for t in tiled),
    visual_len=max(t.plan.tokens for t in tiled),
  )
  encode = jax.jit(lambda p, im: ours.run.model.apply({"params": p}, im, method=VLM.encode_images))
  visual = np.asarray(encode(ours.params, batch))
  errors = []
  for r, (image, t) in enumerate(zip(images, tiled)):
    inputs = _hf_inputs(tiny_next["processor"], image)
    with torch.no_grad():
      hf = (
        tiny_next["hf"]
        .model.get_image_features(
          inputs["pixel_values"],
          inputs["image_sizes"],
          vision_feature_layer=-2,
          vision_feature_select_strategy="default",
        )
        .pooler_output[0]
        .numpy()
      )
      logits = tiny_next["hf"](**inputs).logits.numpy()
    assert hf.shape[0] == t.plan.tokens
    np.testing.assert_allclose(
      _vit_input(ours, t.tiles), inputs["pixel_values"][0].numpy().transpose(0, 2, 3, 1), atol=1e-5
    )
    errors.append(float(np.abs(visual[r, : t.plan.tokens] - hf).max()))
    # Whole model: our logits from the same ids (the processor's expansion) and our own tiles.
    ids = inputs["input_ids"].numpy().astype(np.int32)
    assert (ids == ours.tokenizer.image_id).sum() == t.plan.tokens
    ours_logits = _logits(ours, ids, ours.anyres.collate_rows([[t]], t.plan.tokens))
    errors.append(float(np.abs(ours_logits - logits).max()))
  print(f"max abs error, visual tokens / logits: {max(errors[0::2]):.2e} / {max(errors[1::2]):.2e}")
  assert max(errors) < 1e-4


def _logits(model, ids: np.ndarray, images: dict) -> np.ndarray:
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  apply = jax.jit(lambda p, *inputs: model.run.model.apply({"params": p}, *inputs))
  return np.asarray(apply(model.params, ids, images, positions, np.ones(ids.shape, np.int32)))


def test_llava_next_round_trip_is_bit_identical_and_loads_in_transformers(tiny_next, tmp_path):
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  assert cli.main(["convert", "--from-hf", tiny_next["dir"], "--out", work]) == 0
  assert cli.main(["convert", "--checkpoint", work, "--to-hf", out]) == 0
  a, b = read_all(tiny_next["dir"]), read_all(out)
  assert sorted(a) == sorted(b) and "image_newline" in a
  for key in a:
    assert a[key].tobytes() == b[key].tobytes(), key
  back = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
  inputs = _hf_inputs(tiny_next["processor"], _image((45, 77)))
  with torch.no_grad():
    np.testing.assert_allclose(back(**inputs).logits.numpy(), tiny_next["hf"](**inputs).logits.numpy(), atol=1e-5)


# --- Training: static shapes over a mix of image sizes -----------------------------------------
def _anyres_config(tok, overrides=None):
  # 32-px tiles of 2x2 patches; shapes:wide images are 32 x 128..192: grids 1x4..1x6.
  cfg = helpers.tiny_config(
    {
      "model.vision.image_size": 32,
      "model.vision.patch_size": 16,
      "model.anyres.enabled": True,
      "model.anyres.grid_pinpoints": "(1x1),...,(1x6)",
      "data.sources": "shapes:wide",
      "evals.shapes_test.data": "shapes:wide_test",
      "data.seq_len": 96,
      **(overrides or {}),
    }
  )
  build_lib.resolve_model_config(cfg, tok.vocab_size)
  return cfg


def _batches(cfg, tok, tile_groups: int):
  return Batches(cfg, tok, helpers.image_tokens(cfg.model), tile_groups=tile_groups)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


# Grid bridges that shrink the grid: 32-px tiles of 4x4 8-px patches, pixel shuffled or pooled to 2x2.
SHRINKING = {
  "pixel_shuffle": {"model.vision.patch_size": 8, "model.bridge.kind": "pixel_shuffle"},
  "cabstractor": {
    "model.vision.patch_size": 8,
    "model.bridge.kind": "cabstractor",
    "model.bridge.num_tokens": 4,
    "model.bridge.depth": 1,
  },
}


@pytest.mark.parametrize(
  "mesh,accum,max_tiles,bridge",
  [((8, 1, 1), 1, 0, None), ((2, 2, 2), 2, 96, "pixel_shuffle"), ((8, 1, 1), 1, 0, "cabstractor")],
)
def test_training_on_mixed_image_sizes_compiles_once(tok, mesh, accum, max_tiles, bridge):
  cfg = _anyres_config(
    tok,
    {
      "mesh.data": mesh[0],
      "mesh.fsdp": mesh[1],
      "mesh.tensor": mesh[2],
      "train.grad_accum": accum,
      "model.anyres.max_tiles": max_tiles,
      "train.batch_size": 16,
      **SHRINKING.get(bridge, {}),
    },
  )
  m = parallel.make_mesh(cfg.mesh)
  run = trainer_lib.build(cfg, m, tok.image_id)
  data = _batches(cfg, tok, parallel.batch_divisor(m) * accum)
  # A compile is XLA's, or an executable read from the suite's compilation cache in its place.
  compiles = []
  listener = lambda event, *_, **__: (
    compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
  )
  cache_hit = lambda event, **__: compiles.append(event) if event == "/jax/compilation_cache/cache_hits" else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  jax.monitoring.register_event_listener(cache_hit)
  try:
    state = run.init(jax.random.key(0))
    counts, shapes, losses = set(), set(), []
    for step in range(6):
      batch = device_batch(next(data))
      counts |= set((batch["tokens"] == tok.image_id).sum(1).tolist()) - {0}  # one per grid
      # Every image's placeholders are its plan's tokens, and every token source is a real feature
      # of its group's pool (the bridge's 2x2 tokens a tile, not the 4x4 patches).
      pool = 1 + batch["images"]["tiles"].shape[1] * helpers.image_tokens(cfg.model)
      assert batch["images"]["index"].max() < pool
      if bridge:
        assert helpers.image_tokens(cfg.model) == 4
      shapes.add(tuple((k, v.shape) for k, v in jax.tree_util.tree_leaves_with_path(batch)))
      state, metrics = run.train_step(state, parallel.global_batch(batch, m))
      losses.append(float(metrics["train/loss"]))
      if step == 0:
        first = len(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(cache_hit)
  print(
    f"image token counts {sorted(counts)}; compiles: {first} in step 1, {len(compiles) - first} after; "
    f"train_step cache entries {run.train_step.__wrapped__._cache_size()}"
  )
  assert len(counts) >= 3 and len(shapes) == 1  # many image sizes, one batch shape
  assert first >= 1 and len(compiles) == first  # nothing compiles after the first step
  assert run.train_step.__wrapped__._cache_size() == 1
  assert all(np.isfinite(losses)) and "image_newline" in state["params"]


def test_a_tight_tile_budget_leaves_rows_empty_and_drops_nothing(tok):
  # 2 groups of 8 tiles: two images (5 to 7 tiles each) never share a group.
  cfg = _anyres_config(tok, {"model.anyres.max_tiles": 16, "train.batch_size": 8})
  data = _batches(cfg, tok, tile_groups=2)
  seen = []
  for _ in range(4):
    batch = next(data)
    rows_with_tokens = int((batch["segment_ids"].sum(1) > 0).sum())
    assert rows_with_tokens <= 2  # one image per group of 8 tile slots
    assert batch["images"]["tiles"].shape == (2, 8, 32, 32, 3)
    seen += [key for row in batch["keys"] for key in row]
  # Every sample was used once, none skipped: the same samples as the stream's start with room to spare.
  roomy = _batches(_anyres_config(tok, {"train.batch_size": 8}), tok, tile_groups=2)
  stream = [key for _ in range(4) for row in next(roomy)["keys"] for key in row]
  assert len(seen) == len(set(seen)) and set(seen) == set(stream[: len(seen)])
  assert not data.skipped


def test_packed_anyres_rows_give_each_sample_its_unpacked_loss(tok):
  # 2 rows of 96 tokens share one pool of 28 tiles: room for two 22-30-token images a row.
  cfg = _anyres_config(
    tok,
    {
      "data.pack": True,
      "data.max_images": 3,
      "train.batch_size": 2,
      "model.anyres.max_tiles": 28,
      "data.threads": 0,
      "data.prefetch": 0,
    },
  )
  data = _batches(cfg, tok, tile_groups=1)
  packed = next(data)
  assert max(len(row) for row in packed["keys"]) >= 2
  assert packed["images"]["tiles"].shape == (1, 28, 32, 32, 3)
  rows = [[data.prepare((0, int(k)))] for row in packed["keys"] for k in row]
  one_each = TileGroups(data.prepare.anyres, len(rows), data.prepare.anyres.spec.max_tiles, cfg.data.seq_len)
  unpacked = {**one_each.collate(rows), **collate_text(rows, cfg.data.seq_len, tok.pad_id)}
  model = VLM(cfg.model, tok.image_id)
  params = model.init(jax.random.key(0), *tasks.task_of(cfg).dummy_inputs(cfg, 1))["params"]
  a, b = helpers.per_sample_loss(model, params, packed), helpers.per_sample_loss(model, params, unpacked)
  assert a.keys() == b.keys()
  np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5)


def test_anyres_resume_sees_the_batches_of_an_unbroken_run(tok):
  # A tight budget: samples often open the next batch, whose state must replay them.
  cfg = _anyres_config(
    tok, {"model.anyres.max_tiles": 16, "train.batch_size": 8, "data.pack": True, "data.max_images": 2}
  )
  k = 3
  data = _batches(cfg, tok, tile_groups=2)
  unbroken = [next(data) for _ in range(2 * k)]
  first = _batches(cfg, tok, tile_groups=2)
  for _ in range(k):
    next(first)
  resumed = _batches(cfg, tok, tile_groups=2)
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  for a, b in zip([next(resumed) for _ in range(k)], unbroken[k:]):
    assert a["keys"] == b["keys"]
    for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(device_batch(a)), jax.tree_util.tree_leaves(device_batch(b))
    ):
      np.testing.assert_array_equal(x, y, err_msg=str(path))


def test_a_sample_with_more_tiles_than_a_group_holds_is_skipped(tok):
  cfg = _anyres_config(tok, {"data.max_images": 2, "model.anyres.max_tiles": 8, "train.batch_size": 8})
  prepare = _batches(cfg, tok, tile_groups=1).prepare  # one group of 8 tile slots
  strip = np.zeros((32, 160, 3), np.uint8)  # a 1x5 grid and the base view: 6 tiles
  question = f"{IMAGE} What shape is in the image?"
  one = prepare.prepare(Sample("one", [("user", question), ("assistant", "circle")], [strip]))
  assert one.tiles == 6 and (one.tokens == tok.image_id).sum() == one.plans[0].tokens
  with pytest.raises(BadSample, match="12 tiles > 8") as e:
    prepare.prepare(Sample("two", [("user", IMAGE + question), ("assistant", "circle")], [strip, strip]))
  assert e.value.reason == "too_many_tiles"


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model.anyres.max_tiles": 48}, "less than the 7 one image can need"),
    ({"model.anyres.max_tiles": 15}, "multiple of the 8 tile groups"),
  ],
)
def test_a_tile_budget_below_one_sample_is_an_error(tok, overrides, match):
  cfg = _anyres_config(tok, overrides)
  with pytest.raises(UserError, match=match):
    _batches(cfg, tok, tile_groups=8)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model.anyres.grid_pinpoints": "[[30, 64]]"}, "grid_pinpoints"),
    ({"model.bridge.kind": "perceiver"}, "perceiver"),
    ({"model.vision.flavour": "clip", "model.vision.keep_cls": True}, "keep_cls"),
  ],
)
def test_bad_anyres_configs_are_errors(tok, overrides, match):
  with pytest.raises(UserError, match=match):
    _anyres_config(tok, overrides)


# --- `vlm-jax tokens` -------------------------------------------------------------------------
NEXT_REF = "configs/llava_next_ref.py"


@pytest.mark.parametrize(
  "args,expected",
  [
    (
      (NEXT_REF, "600x1000"),
      {"height": 600, "width": 1000, "grid": [2, 2], "tiles": 5, "image_tokens": 1948, "tile_tokens": 576},
    ),
    (
      (NEXT_REF, "336x336"),
      {"height": 336, "width": 336, "grid": [1, 2], "tiles": 3, "image_tokens": 1176, "tile_tokens": 576},
    ),
    (
      (NEXT_REF, "2000x500"),
      {"height": 2000, "width": 500, "grid": [3, 1], "tiles": 4, "image_tokens": 1944, "tile_tokens": 576},
    ),
    (
      (NEXT_REF, "600x1000", "--config.model.anyres.base_view=false"),
      {"height": 600, "width": 1000, "grid": [2, 2], "tiles": 4, "image_tokens": 1948 - 576, "tile_tokens": 576},
    ),
    (
      ("configs/shapes_tiny.py", "600x1000"),
      {"height": 600, "width": 1000, "grid": [1, 1], "tiles": 1, "image_tokens": 16, "tile_tokens": 16},
    ),
    (
      ("configs/llava15_ref.py:stage1", "600x1000"),
      {"height": 600, "width": 1000, "grid": [1, 1], "tiles": 1, "image_tokens": 576, "tile_tokens": 576},
    ),
    (
      ("configs/llava15_ref.py:stage2", "20x2000"),
      {"height": 20, "width": 2000, "grid": [1, 1], "tiles": 1, "image_tokens": 576, "tile_tokens": 576},
    ),
    # Grid bridges that shrink the grid: AnyRes counts their tokens (24x24 patches -> 12x12 / 8x8).
    (
      (NEXT_REF, "600x1000", "--config.model.bridge.kind=pixel_shuffle"),
      {"height": 600, "width": 1000, "grid": [2, 2], "tiles": 5, "image_tokens": 144 + 14 * 25, "tile_tokens": 144},
    ),
    (
      (NEXT_REF, "600x1000", "--config.model.bridge.kind=cabstractor", "--config.model.bridge.num_tokens=64"),
      {"height": 600, "width": 1000, "grid": [2, 2], "tiles": 5, "image_tokens": 64 + 10 * 17, "tile_tokens": 64},
    ),
    (
      (
        "configs/shapes_tiny.py",
        "600x1000",
        "--config.model.bridge.kind=qformer",
        "--config.model.bridge.num_queries=7",
      ),
      {"height": 600, "width": 1000, "grid": [1, 1], "tiles": 1, "image_tokens": 7, "tile_tokens": 7},
    ),
  ],
)
def test_tokens_command(args, expected, capsys, monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config, size, *flags = args
  assert cli.main(["tokens", "--config", config, "--image-size", size, "--json", *flags]) == 0
  assert json.loads(capsys.readouterr().out) == expected  # exactly one JSON object on stdout
  assert cli.main(["tokens", "--config", config, "--image-size", size, *flags]) == 0
  assert f"{expected['image_tokens']} image tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
  "size,needle", [("0x500", ">= 1"), ("0x0", ">= 1"), ("600", "HxW"), ("axb", "HxW"), ("-3x5", "HxW")]
)
def test_tokens_command_bad_sizes(size, needle, capsys, monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert cli.main(["tokens", "--config", NEXT_REF, f"--image-size={size}", "--json"]) == 2
  out = capsys.readouterr()
  assert out.out == "" and len(out.err.strip().splitlines()) == 1 and needle in out.err


def test_generate_tiles_each_prompt_image_as_transformers_does(tiny_next):
  ours = vlm_jax.load(tiny_next["dir"], dtype="float32")
  images = [_image((45, 77), seed=1), _image((90, 20), seed=2)]  # different plans in one batch
  prompt = "USER: <image> what color"
  got = ours.generate_ids(images, [prompt] * 2, max_new_tokens=8, raw_prompt=True)
  hf = tiny_next["hf"]
  hf.generation_config.eos_token_id = None
  for image, ids in zip(images, got):
    inputs = _hf_inputs(tiny_next["processor"], image)
    assert ours.encode_prompt(prompt, raw_prompt=True, image=image).tolist() == inputs["input_ids"][0].tolist()
    with torch.no_grad():
      want = hf.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=hf_models.PAD)
    assert ids == want[0, inputs["input_ids"].shape[1] :].tolist()
  # Both images in one prompt, each tiled by its own plan.
  prompt = "USER: <image> <image> what color"
  inputs = tiny_next["processor"](images=images, text=[prompt], return_tensors="pt", input_data_format="channels_last")
  assert ours.encode_prompt(prompt, raw_prompt=True, image=images).tolist() == inputs["input_ids"][0].tolist()
  with torch.no_grad():
    want = hf.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=hf_models.PAD)
  got = ours.generate_ids([images], [prompt], max_new_tokens=8, raw_prompt=True)[0]
  assert got == want[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("size", [(1080, 1920), (3000, 4000), (600, 1000), (2000, 400), (384, 384)])
def test_onevision_token_sources_match_its_packing(size):
  """anyres_max_9's bilinear shrink (4 taps a token), against LlavaOnevisionModel.pack_image_features
  on random features (the model's weights play no part in the packing)."""
  plan = anyres.plan(size, ONEVISION)
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(plan.tiles, 27 * 27, 8)).astype(np.float32)
  newline = rng.normal(size=(8,)).astype(np.float32)
  index, weight = anyres.token_sources(plan, ONEVISION)
  pool = np.concatenate([newline[None], feats.reshape(-1, 8)])
  ours = (pool[index] * weight[..., None]).sum(1)
  fake = types.SimpleNamespace(
    config=types.SimpleNamespace(
      vision_config=types.SimpleNamespace(image_size=384, patch_size=14),
      image_grid_pinpoints=[list(p) for p in ONEVISION.pinpoints],
    )
  )
  packed, lens = transformers.LlavaOnevisionModel.pack_image_features(
    fake, [torch.from_numpy(feats)], torch.tensor([size]), torch.from_numpy(newline)
  )
  assert list(lens) == [plan.tokens]
  # torch's float32 source positions (ulp 4e-6 at 40) bound the agreement of the bilinear taps.
  np.testing.assert_allclose(ours, packed[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("flavour", ["clip", "siglip"])
def test_model_trained_here_exports_to_a_working_llava_next(flavour, tmp_path):
  """A from-scratch AnyRes model: the exported directory's own AutoProcessor and
  LlavaNextForConditionalGeneration give our token counts, tiles and logits."""
  tok = Tokenizer.load("shapes")
  cfg = _anyres_config(
    tok,
    {
      "model.vision.flavour": flavour,
      "model.vision.patch_size": 8,
      "mesh.data": -1,
      "model.anyres.grid_pinpoints": str(TINY_PINPOINTS),
    },
  )
  run = build_lib.build(cfg, parallel.make_mesh(cfg.mesh), tok.image_id)
  params = run.init_params(jax.random.key(4))
  out = str(tmp_path / "out")
  hf_export.export(cfg, tok, params, None, out)
  processor = transformers.AutoProcessor.from_pretrained(out)
  hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
  ours = vlm_jax.load(out, dtype="float32")
  for size in [(45, 77), (90, 20)]:
    image = _image(size, seed=9)
    inputs = processor(
      images=[image],
      text=["<image>\nWhat shape is in the image?"],
      return_tensors="pt",
      input_data_format="channels_last",
    )
    plan = ours.anyres.plan(image)
    assert int((inputs["input_ids"] == tok.image_id).sum()) == plan.tokens
    t = ours.anyres.prepare(image)
    np.testing.assert_allclose(
      _vit_input(ours, t.tiles), inputs["pixel_values"][0].numpy().transpose(0, 2, 3, 1), atol=1e-5
    )
    with torch.no_grad():
      want = hf(**inputs).logits.numpy()
    got = _logits(ours, inputs["input_ids"].numpy().astype(np.int32), ours.anyres.collate_rows([[t]], plan.tokens))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_run_started_before_anyres_existed_still_resumes(tmp_path):
  cfg = helpers.tiny_config()
  loop.write_config(cfg, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["anyres"]  # as written by an earlier version
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loop.check_workdir(cfg, str(tmp_path))  # no "different config" error
  cfg.model.anyres.enabled = True
  with pytest.raises(UserError, match="model.anyres.enabled"):
    loop.check_workdir(cfg, str(tmp_path))
  assert config_lib.from_json(json.dumps(saved)).model.anyres.enabled is False
