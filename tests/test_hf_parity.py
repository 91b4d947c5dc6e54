"""Parity on real inputs: LLaVA checkpoints written by transformers itself (model, processor and
tokenizer through save_pretrained) give transformers' pixel inputs, prompt ids and greedy tokens
through vlm_jax.load and `vlm-jax generate`, for each image processor kind LLaVA checkpoints ship
with, on images of every aspect ratio; export writes a processor that does what we do."""

import dataclasses
import json
import logging
import os

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from tokenizers import processors
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import hf_models
import vlm_jax
from vlm_jax import cli
from vlm_jax.convert import hf_export
from vlm_jax.data.images import Preprocessing
from vlm_jax.errors import UserError

QUESTION = "what color is the circle"
NEW_TOKENS = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# llava-1.5-hf's chat template: typed content, images first.
CHAT = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
        "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
        "{{ 'ASSISTANT:' }}{% endif %}")
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's, at a 32-px tile

# kind -> (vision flavour, vision_feature_select_strategy, image processor); 16-px CLIP/SigLIP
# towers of 8-px patches, 32-px tiles for AnyRes. Each kind has its own LLM family (FAMILY).
KINDS = {
    # llava-1.5-hf: shortest edge then a centre crop (here the short side goes to 20, the crop to 16)
    "clip_crop": ("clip", "default", lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}, image_mean=CLIP_MEAN, image_std=CLIP_STD)),
    # SigLIP: squash to the square
    "siglip": ("siglip", "full", lambda: SiglipImageProcessorPil(size={"height": 16, "width": 16})),
    # The original LLaVA-1.5 recipe: pad to a square with the mean colour, then resize and crop
    "llava_pad": ("clip", "default", lambda: LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=CLIP_MEAN,
        image_std=CLIP_STD)),
    # LLaVA-NeXT AnyRes tiles
    "next": ("clip", "default", lambda: LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=TINY_PINPOINTS,
        image_mean=CLIP_MEAN, image_std=CLIP_STD)),
}
# LLaVA CLIP+Llama, SigLIP+Qwen2, a padded LLaVA over Gemma, LLaVA-NeXT over Mistral with a
# 5-token window (far shorter than its sequences).
FAMILY = {"clip_crop": "llama", "siglip": "qwen2", "llava_pad": "gemma", "next": "mistral"}
# (H, W): portrait, landscape, square, 1:10 strip, 10:1 strip; AnyRes also one too elongated for
# any grid (no feature row survives unpadding: the base view alone).
SIZES = [(40, 24), (24, 40), (30, 30), (12, 120), (120, 12)]
NEXT_SIZES = [(90, 50), (50, 90), (64, 64), (12, 120), (120, 12), (3, 300)]


def _image(size, seed=0) -> PIL.Image.Image:
  """Smooth colour gradients plus noise: resampling and cropping differences show."""
  h, w = size
  rng = np.random.default_rng([seed, h, w])
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], -1)
  return PIL.Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def _save_tokenizer(directory: str, bos: str = "added") -> None:
  """hf_models' word-level tokenizer; bos: "added" (its post-processor adds BOS, as Llama's),
  "not_added" (BOS defined, never added), "none" (no BOS at all, as Qwen2's)."""
  tok = hf_models.save_tokenizer(directory, template=None)
  if bos != "added":
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok.save(os.path.join(directory, "tokenizer.json"))
  if bos == "none":
    hf_models.edit_json(os.path.join(directory, "tokenizer_config.json"), bos_token=None)


def _write_checkpoint(directory: str, kind: str, bos: str = "added", chat: str = CHAT, seed: int = 0):
  """A tiny random LLaVA(-NeXT) saved by transformers: model, then processor (which rewrites the
  tokenizer files and writes processor_config.json and the chat template)."""
  flavour, strategy, image_processor = KINDS[kind]
  _save_tokenizer(directory, bos)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  vision = hf_models.vision_config(flavour)
  text = hf_models.text_config(FAMILY[kind], 64)
  if kind == "next":
    vision.image_size = 32
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                                          image_grid_pinpoints=TINY_PINPOINTS)
    model = transformers.LlavaNextForConditionalGeneration(config)
    processor_cls = transformers.LlavaNextProcessor
  else:
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                                      vision_feature_select_strategy=strategy)
    model = transformers.LlavaForConditionalGeneration(config)
    processor_cls = transformers.LlavaProcessor
  model = hf_models.randomize(model, seed)
  model.config._attn_implementation = "eager"
  model.save_pretrained(directory)
  processor = processor_cls(image_processor=image_processor(), tokenizer=tokenizer, patch_size=8,
                            vision_feature_select_strategy=strategy, num_additional_image_tokens=int(flavour == "clip"),
                            chat_template=chat)
  processor.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for kind in KINDS:
    d = str(tmp_path_factory.mktemp(kind))
    model = _write_checkpoint(d, kind)
    out[kind] = {"dir": d, "hf": model, "processor": transformers.AutoProcessor.from_pretrained(d, backend="pil")}
  return out


def _hf_inputs(processor, image: PIL.Image.Image, prompt: str | None = None, raw: bool = False):
  """As a transformers user: the chat template renders the prompt, the processor tokenizes it
  (without a second BOS if the template wrote one) and preprocesses the image."""
  if raw:
    return processor(images=[image], text=[prompt], return_tensors="pt")
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or QUESTION}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  bos = processor.tokenizer.bos_token
  return processor(images=[image], text=[text], return_tensors="pt",
                   add_special_tokens=not (bos and text.startswith(bos)))


def _hf_greedy(model, inputs, **kwargs) -> list[int]:
  """32 new tokens, cut at EOS as ours are (ours drop it)."""
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=hf_models.PAD, **kwargs)
  new = out[0, inputs["input_ids"].shape[1]:].tolist()
  return new[:new.index(hf_models.EOS)] if hf_models.EOS in new else new


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


@pytest.mark.parametrize("kind", KINDS)
def test_pixels_prompt_ids_and_greedy_tokens_equal_transformers(kind, checkpoints, tmp_path, capsys):
  c = checkpoints[kind]
  ours = vlm_jax.load(c["dir"], dtype="float32")
  expected_mode = {"clip_crop": "shortest_edge_crop", "llava_pad": "pad_square"}.get(kind, "squash")
  assert ours.config.data.image_resize == expected_mode
  lengths = []
  for i, size in enumerate(_sizes(kind)):
    image = _image(size, seed=i)
    inputs = _hf_inputs(c["processor"], image)
    # Pixels: the processor's pixel_values, every tile (fp32).
    mine, theirs = _our_pixels(ours, image), _their_pixels(c["processor"], image)
    assert mine.shape == theirs.shape, size
    np.testing.assert_allclose(mine, theirs, atol=1e-5, err_msg=str(size))
    # Prompt ids: template, BOS and image-token expansion.
    assert ours.encode_prompt(QUESTION, image=image).tolist() == inputs["input_ids"][0].tolist(), size
    # Greedy tokens, through the Python API and the CLI (from the image saved as a file).
    expected = _hf_greedy(c["hf"], inputs)
    lengths.append(len(expected))
    assert ours.generate_ids([image], [QUESTION], max_new_tokens=NEW_TOKENS) == [expected], size
    path = str(tmp_path / f"{kind}_{i}.png")
    image.save(path)
    assert cli.main(["generate", "--checkpoint", c["dir"], "--image", path, "--prompt", QUESTION,
                     "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected, size
  assert max(lengths) == NEW_TOKENS  # the comparison covers whole answers, not an early EOS
  # Logits at every position (greedy tokens alone can agree while logits do not).
  inputs = _hf_inputs(c["processor"], image)
  with torch.no_grad():
    theirs = c["hf"](**inputs).logits[0].numpy()
  ids = inputs["input_ids"].numpy().astype(np.int32)
  positions = np.arange(ids.shape[1])[None]
  mine = ours.run.model.apply({"params": ours.params}, ids, ours.pixels([image]), positions, np.ones_like(positions))
  np.testing.assert_allclose(np.asarray(mine)[0], theirs, atol=1e-4)
  # Greedy with transformers' repetition penalty (over the prompt's ids and the answer's).
  image = _image(_sizes(kind)[0])
  expected = _hf_greedy(c["hf"], _hf_inputs(c["processor"], image), repetition_penalty=4.0)
  assert expected != _hf_greedy(c["hf"], _hf_inputs(c["processor"], image))  # the penalty changes the answer
  assert ours.generate_ids([image], [QUESTION], max_new_tokens=NEW_TOKENS, repetition_penalty=4.0) == [expected]


@pytest.mark.parametrize("bos", ["added", "not_added", "none", "template"])
def test_prompt_ids_follow_the_tokenizers_bos_rule(bos, tmp_path):
  """BOS as the tokenizer adds it, raw and templated; a template that writes {{ bos_token }}
  gets it once."""
  chat = "{{ bos_token }}" + CHAT if bos == "template" else CHAT
  d = str(tmp_path / bos)
  _write_checkpoint(d, "siglip", bos="added" if bos == "template" else bos, chat=chat)
  processor = transformers.AutoProcessor.from_pretrained(d, backend="pil")
  ours = vlm_jax.load(d, dtype="float32")
  image = _image((24, 40))
  raw = "USER: <image> what color is the circle ASSISTANT:"
  theirs_raw = _hf_inputs(processor, image, raw, raw=True)["input_ids"][0].tolist()
  theirs = _hf_inputs(processor, image)["input_ids"][0].tolist()
  assert ours.encode_prompt(raw, raw_prompt=True, image=image).tolist() == theirs_raw
  assert ours.encode_prompt(QUESTION, image=image).tolist() == theirs
  bos_id = processor.tokenizer.bos_token_id
  starts_with_bos = {"added": True, "not_added": False, "none": False, "template": True}[bos]
  assert (theirs[0] == bos_id) == starts_with_bos and theirs.count(bos_id) == int(starts_with_bos)
  assert (theirs_raw[0] == bos_id) == (bos in ("added", "template"))


@pytest.mark.parametrize("kind", KINDS)
def test_export_of_an_imported_checkpoint_gives_our_pixels(kind, checkpoints, tmp_path):
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  assert cli.main(["convert", "--from-hf", checkpoints[kind]["dir"], "--out", work]) == 0
  assert cli.main(["convert", "--checkpoint", work, "--to-hf", out]) == 0
  ours = vlm_jax.load(work)
  processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
  for i, size in enumerate(_sizes(kind)):
    image = _image(size, seed=i)
    np.testing.assert_allclose(_our_pixels(ours, image), _their_pixels(processor, image), atol=1e-5,
                               err_msg=str(size))


@pytest.mark.parametrize("resize,short_side", [("pad_square", 0), ("shortest_edge_crop", 20), ("squash", 0)])
def test_export_writes_a_changed_resize_mode(resize, short_side, checkpoints, tmp_path):
  """A model imported with one processor and trained with another exports the one it used."""
  ours = vlm_jax.load(checkpoints["siglip"]["dir"])
  ours.config.data.update(dict(image_resize=resize, image_short_side=short_side, image_mean=CLIP_MEAN,
                               image_std=CLIP_STD))
  out = str(tmp_path / "out")
  hf_export.export(ours.config, ours.tokenizer, ours.params, ours.origin, out)
  processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
  pre = Preprocessing.from_config(ours.config)
  for i, size in enumerate(SIZES):
    image = _image(size, seed=i)
    on_host = dataclasses.replace(pre, on_device=False)  # the float path, with the changed mean and std
    np.testing.assert_allclose(on_host(image)[None], _their_pixels(processor, image), atol=1e-5, err_msg=str(size))
  # And it imports back to the same settings.
  again = vlm_jax.load(out)
  assert Preprocessing.from_config(again.config) == pre


def test_unsupported_processor_settings_are_said_in_one_line(checkpoints, tmp_path, caplog):
  d = str(tmp_path / "odd")
  _write_checkpoint(d, "siglip")
  path = os.path.join(d, "processor_config.json")
  hf_models.edit_json(path, **{"image_processor.image_processor_type": "Idefics3ImageProcessor"})
  with caplog.at_level(logging.WARNING, logger="vlm_jax"):
    vlm_jax.load(d)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "Idefics3ImageProcessor is not an image processor vlm-jax reproduces" in warnings[0]
  assert "\n" not in warnings[0]
  hf_models.edit_json(path, **{"image_processor.image_processor_type": "CLIPImageProcessor",
                               "image_processor.do_center_crop": True,
                               "image_processor.crop_size": {"height": 12, "width": 12}})
  with pytest.raises(UserError, match=r"processor_config.json: crop_size .* is not the vision tower's image_size 16"):
    vlm_jax.load(d)
