"""Host-side data: the shapes set, tokenizer, chat template, images and batches."""

import collections
import dataclasses
import re

import numpy as np
import PIL.Image
import pytest
import sentencepiece

from vlm_jax import config as config_lib
from vlm_jax.data import images, shapes, shapes_tokenizer, sources, tokenizer
from vlm_jax.data.shapes import Shape
from vlm_jax.data.templates import encode_conversation, encode_prompt
from vlm_jax.errors import UserError
from vlm_jax.eval import examples as eval_examples

ANSWER_WORDS = list(shapes.COLORS) + list(shapes.SHAPES) + list(shapes.NUMBERS) + list(shapes.SIDES)


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer.load("shapes")


@pytest.fixture(scope="module")
def examples():
  return [shapes.make_example(3, "train", i, image_size=64) for i in range(300)]


# --- shapes ------------------------------------------------------------------------------------


def test_make_example_is_deterministic():
  a, b = shapes.make_example(7, "train", 11, 64), shapes.make_example(7, "train", 11, 64)
  assert np.array_equal(a.image, b.image) and a.turns == b.turns and a.answer == b.answer
  c = shapes.make_example(7, "train", 12, 64)
  assert not np.array_equal(a.image, c.image)
  d = shapes.make_example(8, "train", 11, 64)
  assert not np.array_equal(a.image, d.image)


def test_train_and_test_splits_differ():
  # Layouts repeat within a split (there are few single-shape images), never across splits.
  train = {shapes.make_example(0, "train", i, 64).image.tobytes() for i in range(2000)}
  test = {shapes.make_example(0, "test", i, 64).image.tobytes() for i in range(300)}
  assert len(test) > 200 and not train & test


def test_held_out_split_depends_on_the_image_not_on_number_types():
  # Tests draw images from hand-written layouts with int coordinates; the split must agree.
  for i in range(50):
    ex = shapes.make_example(0, "test", i, 64)
    (background,) = [k for k, v in shapes.BACKGROUNDS.items() if tuple(ex.image[0, 0]) == v]
    as_ints = [dataclasses.replace(o, cx=int(o.cx), cy=int(o.cy), size=int(o.size)) for o in ex.objects]
    assert shapes._is_held_out(as_ints, background)


def test_unknown_split_is_a_user_error():
  with pytest.raises(UserError, match="unknown split 'val'"):
    shapes.make_example(0, "val", 0, 64)


def _pixel(image, o):
  return tuple(image[int(o.cy), int(o.cx)])


def test_examples_are_well_formed(examples):
  for ex in examples:
    assert ex.image.dtype == np.uint8 and ex.image.shape == (64, 64, 3)
    # Training conversations ask every kind once each; <image> only in round 1.
    assert [r for r, _ in ex.turns] == ["user", "assistant"] * len(shapes.KINDS)
    assert ex.turns[0][1].startswith("<image>\n") and ex.turns[1][1] == ex.answer
    assert sum("<image>" in text for _, text in ex.turns) == 1
    assert 1 <= len(ex.objects) <= 3
    n = len(ex.objects)
    assert len({o.shape for o in ex.objects}) == len({o.color for o in ex.objects}) == n
    for o in ex.objects:
      assert o.size == 12
      # Each shape lies inside its own 16-px grid cell.
      col, row = int(o.cx // 16), int(o.cy // 16)
      assert col * 16 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= (col + 1) * 16
      assert row * 16 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= (row + 1) * 16
    assert len({(int(o.cx // 16), int(o.cy // 16)) for o in ex.objects}) == n
    # The drawn colours are exactly the objects' colours plus the background, and each
    # shape is large (no shape hides another): triangles cover half their square.
    colors, counts = np.unique(ex.image.reshape(-1, 3), axis=0, return_counts=True)
    drawn = {tuple(int(v) for v in c): n for c, n in zip(colors, counts)}
    background = set(drawn) - {shapes.COLORS[o.color] for o in ex.objects}
    assert len(background) == 1 and background <= set(shapes.BACKGROUNDS.values())
    for o in ex.objects:
      assert drawn[shapes.COLORS[o.color]] >= 0.4 * o.size**2


def test_answers_agree_with_the_pixels(examples):
  for ex in examples:
    question = ex.turns[0][1]
    by_shape = {o.shape: o for o in ex.objects}
    by_color = {o.color: o for o in ex.objects}
    if ex.kind == "color":
      shape = re.fullmatch(r"<image>\nWhat color is the (\w+)\?", question)[1]
      assert _pixel(ex.image, by_shape[shape]) == shapes.COLORS[ex.answer]
    elif ex.kind == "shape":
      color = re.fullmatch(r"<image>\nWhat shape is (\w+)\?", question)[1]
      assert by_color[color].shape == ex.answer
      assert _pixel(ex.image, by_color[color]) == shapes.COLORS[color]
    elif ex.kind == "count":
      n_colors = len(np.unique(ex.image.reshape(-1, 3), axis=0)) - 1  # Minus the background.
      assert ex.answer == ("one", "two", "three")[n_colors - 1]
    else:
      shape = re.fullmatch(r"<image>\nWhich side is the (\w+) on\?", question)[1]
      o = by_shape[shape]
      # All of the shape's pixels lie on the answered half of the image.
      ys, xs = np.nonzero(np.all(ex.image == shapes.COLORS[o.color], axis=-1))
      assert np.all(xs < 32) if ex.answer == "left" else np.all(xs >= 32)


def test_test_split_asks_one_question():
  for i in range(50):
    ex = shapes.make_example(3, "test", i, 64)
    assert [r for r, _ in ex.turns] == ["user", "assistant"] and ex.turns[1][1] == ex.answer


def test_all_kinds_and_answers_appear(examples):
  kinds = collections.Counter(ex.kind for ex in examples)
  assert set(kinds) == set(shapes.KINDS)
  assert min(kinds.values()) >= 30
  assert {ex.answer for ex in examples} == set(ANSWER_WORDS)


def test_draw_shapes():
  objects = [
    Shape("circle", "red", 16, 16, 20),
    Shape("square", "blue", 48, 16, 16),
    Shape("triangle", "green", 32, 48, 20),
  ]
  image = shapes.draw_shapes(objects, 64, "dark")
  assert tuple(image[16, 16]) == shapes.COLORS["red"]
  assert tuple(image[16, 48]) == shapes.COLORS["blue"]
  assert tuple(image[9, 41]) == shapes.COLORS["blue"]  # Square corner.
  assert tuple(image[8, 8]) == shapes.BACKGROUNDS["dark"]  # Outside the circle's disk.
  assert tuple(image[48, 32]) == shapes.COLORS["green"]
  assert tuple(image[39, 32]) == shapes.COLORS["green"]  # Near the apex, centre column.
  assert tuple(image[39, 26]) == shapes.BACKGROUNDS["dark"]  # Beside the apex.
  assert tuple(image[57, 23]) == shapes.COLORS["green"]  # Base corner.
  assert tuple(image[0, 0]) == shapes.BACKGROUNDS["dark"]


def test_answer_matches():
  assert shapes.answer_matches("Red.", "red")
  assert shapes.answer_matches("  three ", "three")
  assert shapes.answer_matches("circle!", "Circle")
  assert not shapes.answer_matches("dark red", "red")
  assert not shapes.answer_matches("", "red")
  assert not shapes.answer_matches("square", "circle")


# --- tokenizer ---------------------------------------------------------------------------------


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert 400 <= tok.vocab_size <= 512
  assert tok.encode("<image>") == [tok.image_id]
  assert tok.decode([tok.bos_id] + tok.encode("a <image>\nb") + [tok.eos_id, tok.pad_id]) == "a \nb"


@pytest.mark.parametrize(
  "text",
  [
    "What color is the circle?",
    "USER: <image>\nWhich side is the circle on? ASSISTANT: left",
    "  two  spaces,\ttabs\n\nand newlines  ",
    "Describe this photograph in detail, please.",
  ],
)
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text.replace("<image>", "")
  assert tok.encode(text).count(tok.image_id) == text.count("<image>")


def test_byte_fallback_encodes_any_text(tok):
  text = "naïve 日本語 ☃ 🙂"
  ids = tok.encode(text)
  assert 1 not in ids  # No <unk>: unseen characters become byte pieces.
  assert tok.decode(ids) == text


def test_answer_words_are_one_token(tok):
  for word in ANSWER_WORDS:
    assert len(tok.encode(" " + word)) == 1, word  # As the template places them.
    assert len(tok.encode(word)) == 1, word


def test_shipped_tokenizer_matches_the_code(tok, tmp_path):
  retrained = tokenizer.Tokenizer.load(shapes_tokenizer.train_shapes_tokenizer(str(tmp_path / "t")))
  assert retrained.vocab_size == tok.vocab_size
  assert all(retrained.id_to_piece(i) == tok.id_to_piece(i) for i in range(tok.vocab_size))


def test_tokenizer_load_errors(tmp_path):
  with pytest.raises(UserError, match="tokenizer file not found: .*nope.model"):
    tokenizer.Tokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a sentencepiece model")
  with pytest.raises(UserError, match="cannot read tokenizer .*bad.model") as e:
    tokenizer.Tokenizer.load(str(bad))
  assert "\n" not in str(e.value)
  # A valid sentencepiece model without the <image> symbol cannot place image tokens.
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(["a tiny corpus of words"] * 10),
    model_prefix=str(tmp_path / "plain"),
    vocab_size=40,
    model_type="bpe",
    minloglevel=2,
    hard_vocab_limit=False,
  )
  with pytest.raises(UserError, match="no <image> symbol"):
    tokenizer.Tokenizer.load(str(tmp_path / "plain.model"))


# --- templates ---------------------------------------------------------------------------------

TURNS = [("user", "<image>\nWhat color is the circle?"), ("assistant", "red")]


def test_conversation_layout(tok):
  enc = encode_conversation(TURNS, tok, image_tokens=3)
  assert enc.tokens.dtype == np.int32 and enc.loss_mask.dtype == np.bool_
  # Pieces encoded one by one give exactly the tokens of the whole text.
  whole = tok.encode("USER: <image>\nWhat color is the circle? ASSISTANT: red")
  i = whole.index(tok.image_id)
  whole[i : i + 1] = [tok.image_id] * 3
  assert enc.tokens.tolist() == [tok.bos_id] + whole + [tok.eos_id]
  # Supervised: " red" (one token) and EOS, nothing else.
  assert enc.loss_mask.tolist() == [False] * (len(enc.tokens) - 2) + [True, True]
  assert tok.decode(enc.tokens[enc.loss_mask]) == " red"
  assert tok.decode(enc.tokens[~enc.loss_mask]) == "USER: \nWhat color is the circle? ASSISTANT:"


def test_two_rounds(tok):
  turns = TURNS + [("user", "And the square?"), ("assistant", "blue, I think")]
  enc = encode_conversation(turns, tok, image_tokens=2)
  first = encode_conversation(TURNS, tok, image_tokens=2)
  n = len(first.tokens)
  assert np.array_equal(enc.tokens[:n], first.tokens)
  assert np.array_equal(enc.loss_mask[:n], first.loss_mask)
  rest = enc.tokens[n:]
  assert tok.decode(rest[~enc.loss_mask[n:]]) == "USER: And the square? ASSISTANT:"
  assert tok.decode(rest[enc.loss_mask[n:]]) == " blue, I think"
  assert rest[-1] == tok.eos_id and enc.loss_mask[-1]
  assert enc.tokens.tolist().count(tok.bos_id) == 1


def test_prompt_is_a_prefix_of_the_conversation(tok):
  prompt = encode_prompt(TURNS[0][1], tok, image_tokens=5)
  enc = encode_conversation(TURNS, tok, image_tokens=5)
  assert prompt.dtype == np.int32
  assert np.array_equal(enc.tokens[: len(prompt)], prompt)
  assert not enc.loss_mask[: len(prompt)].any() and enc.loss_mask[len(prompt) :].all()
  # Without <image>, "<image>\n" goes in front (LLaVA) when the model takes image tokens.
  assert np.array_equal(encode_prompt("What color is the circle?", tok, 5), prompt)
  text_only = encode_prompt("What color is the circle?", tok, 0)
  assert tok.image_id not in text_only
  assert tok.decode(text_only) == "USER: What color is the circle? ASSISTANT:"


def test_raw_prompt(tok):
  raw = encode_prompt("Q: <image> what? A:", tok, image_tokens=4, raw=True)
  assert raw[0] == tok.bos_id and raw.tolist().count(tok.image_id) == 4
  assert tok.decode(raw) == "Q:  what? A:"
  assert tok.image_id not in encode_prompt("no image here", tok, image_tokens=4, raw=True)


@pytest.mark.parametrize("image_tokens", [1, 7, 64])
def test_image_expansion(tok, image_tokens):
  tokens = encode_conversation(TURNS, tok, image_tokens).tokens
  where = np.flatnonzero(tokens == tok.image_id)
  assert len(where) == image_tokens and np.all(np.diff(where) == 1)


@pytest.mark.parametrize(
  "turns, kwargs, message",
  [
    (TURNS, {"template": "chatml2"}, "unknown chat template 'chatml2'"),
    ([("user", "hi"), ("bot", "red")], {}, "turn 1: unknown role 'bot'"),
    ([("assistant", "red"), ("user", "hi")], {}, "turn 0: expected a 'user' turn"),
    ([("user", "hi"), ("assistant", "  ")], {}, "turn 1: empty assistant text"),
    ([("user", "hi")], {}, "ends with a user turn"),
    ([], {}, "empty conversation"),
    ([("user", "hi"), ("assistant", "<image>")], {}, "turn 1: <image> in an assistant turn"),
    (TURNS, {"image_tokens": 0}, "no image tokens"),
  ],
)
def test_template_user_errors(tok, turns, kwargs, message):
  kwargs = {"image_tokens": 4, **kwargs}
  with pytest.raises(UserError, match=re.escape(message)) as e:
    encode_conversation(turns, tok, **kwargs)
  assert "\n" not in str(e.value)


def test_prompt_user_errors(tok):
  with pytest.raises(UserError, match="2 <image> placeholders"):
    encode_prompt("<image><image>", tok, 4)
  with pytest.raises(UserError, match="no image tokens"):
    encode_prompt("<image> hi", tok, 0, raw=True)
  with pytest.raises(UserError, match="unknown chat template"):
    encode_prompt("hi", tok, 4, template="nope")


# --- images ------------------------------------------------------------------------------------


def test_load_and_preprocess(tmp_path):
  rgb = np.zeros((30, 40, 3), np.uint8)
  rgb[..., 0] = 255
  PIL.Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
  image = images.load_image(str(tmp_path / "a.png"))
  assert image.mode == "RGB" and image.size == (40, 30)
  x = images.Preprocessing(32)(image)
  assert x.dtype == np.float32 and x.shape == (32, 32, 3)
  np.testing.assert_allclose(x[..., 0], 1.0, atol=1e-6)
  np.testing.assert_allclose(x[..., 1:], -1.0, atol=1e-6)
  # Arrays of the right size skip the resize and match the PIL path.
  ex = shapes.make_example(0, "train", 0, 32).image
  y = images.Preprocessing(32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))(ex)
  np.testing.assert_allclose(y, (ex / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0], rtol=1e-5)
  np.testing.assert_array_equal(images.Preprocessing(32)(PIL.Image.fromarray(ex)), images.Preprocessing(32)(ex))
  grey = images.Preprocessing(8)(np.full((8, 8), 255, np.uint8))
  np.testing.assert_allclose(grey, 1.0)


def test_transparency_is_composited_onto_white(tmp_path):
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[:, :3] = (255, 0, 0, 255)  # opaque red on the left, fully transparent black on the right
  rgba[:, 3:] = (0, 0, 0, 0)
  PIL.Image.fromarray(rgba).save(tmp_path / "t.png")
  loaded = np.asarray(images.load_image(str(tmp_path / "t.png")))
  assert (loaded[:, :3] == (255, 0, 0)).all() and (loaded[:, 3:] == 255).all()
  np.testing.assert_array_equal(images.to_rgb(rgba), loaded)


def test_resize_modes_keep_the_middle_or_pad_around_it():
  # A 20 x 60 image (H x W): left third red, middle green, right third blue.
  rgb = np.zeros((20, 60, 3), np.uint8)
  for k, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
    rgb[:, 20 * k : 20 * (k + 1)] = c
  crop = images.Preprocessing(20, resize="shortest_edge_crop", resample="nearest").pixels(rgb)
  assert crop.shape == (20, 20, 3) and (crop == (0, 255, 0)).all()  # only the middle third survives
  pad = images.Preprocessing(60, resize="pad_square", resample="nearest", fill=(1, 2, 3)).pixels(rgb)
  assert pad.shape == (60, 60, 3)
  assert (pad[:20] == (1, 2, 3)).all() and (pad[40:] == (1, 2, 3)).all()  # bands above and below
  np.testing.assert_array_equal(pad[20:40], rgb)
  squash = images.Preprocessing(30, resample="nearest").pixels(rgb)
  assert squash.shape == (30, 30, 3) and (squash[:, :10] == (255, 0, 0)).all()  # all three thirds kept
  # The default fill is LLaVA's: int(mean * 255).
  assert images.Preprocessing(8, mean=(0.48145466, 0.4578275, 0.40821073)).fill_color == (122, 116, 104)
  # A crop larger than the resized image pads it with zeros around (as transformers' center_crop).
  small = images.center_crop(np.ones((3, 5), np.uint8), 6)
  assert small.shape == (6, 6) and small.sum() == 15 and small[0].sum() == 0


@pytest.mark.parametrize(
  "field,value,needle",
  [
    ("image_resize", "crop", "config.data.image_resize: 'crop' is not one of"),
    ("image_resample", "cubic", "config.data.image_resample: 'cubic' is not one of"),
    ("image_fill", (1, 2), "config.data.image_fill"),
    ("image_fill", (0, 0, 300), "config.data.image_fill"),
    ("image_short_side", -1, "config.data.image_short_side must be >= 0"),
    ("image_std", (0.5, 0.0, 0.5), "config.data.image_std"),
    ("image_mean", (0.5, 0.5), "config.data.image_mean: expected 3 values"),
  ],
)
def test_bad_image_fields_are_one_line_errors(field, value, needle):
  c = config_lib.base()
  c.data[field] = value
  with pytest.raises(UserError, match=re.escape(needle)) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_anyres_tiles_images_itself():
  c = config_lib.base()
  c.model.anyres.enabled, c.data.image_resize = True, "pad_square"
  with pytest.raises(UserError, match="config.data.image_resize: 'pad_square' with AnyRes"):
    config_lib.validate(c)


def test_image_errors(tmp_path):
  with pytest.raises(UserError, match="image file not found: .*missing.png"):
    images.load_image(str(tmp_path / "missing.png"))
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  with pytest.raises(UserError, match="cannot read image .*bad.jpg"):
    images.load_image(str(tmp_path / "bad.jpg"))


# --- eval examples ---------------------------------------------------------------------------

SIZE, SEED = 32, 5


def test_eval_examples_are_the_first_of_the_split():
  evals, skipped = eval_examples.read("shapes:test", sources.Options(seed=SEED, image_size=SIZE), 5)
  assert len(evals) == 5 and not skipped
  for i, ex in enumerate(evals):
    ref = shapes.make_example(SEED, "test", i, SIZE)
    assert np.array_equal(ex.images[0], ref.image) and ex.turns == tuple(ref.turns)
    assert (ex.prompt, ex.reference.answers, ex.category) == (ref.turns[0][1], (ref.answer,), ref.kind)


def test_image_position_after_question(tok):
  ex = shapes.make_example(3, "train", 0, 64, image_position="after")
  assert ex.turns[0][1].endswith("?\n<image>") and "<image>" not in ex.turns[2][1]
  before = shapes.make_example(3, "train", 0, 64)
  assert ex.turns[0][1].replace("\n<image>", "") == before.turns[0][1].replace("<image>\n", "")
  prompt = encode_prompt("What shape is red?", tok, image_tokens=2, image_position="after")
  assert prompt[-4:-2].tolist() == [tok.image_id] * 2 and tok.image_id not in prompt[:-4]
  with pytest.raises(UserError, match="image_position"):
    encode_prompt("x", tok, image_tokens=2, image_position="middle")
