"""Hugging Face CLIPModel / SiglipModel <-> our contrastive model: image and text features equal
transformers', HF -> ours -> HF keeps every tensor, the CLI writes a workdir and exports it back,
and what we cannot represent is one clear line."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import hf_models
from hf_models import convert_error
from vlm_jax import build as build_lib
from vlm_jax import cli
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.build import flat_params
from vlm_jax.convert import contrastive, dispatch
from vlm_jax.convert.safetensors_io import read_all
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.files import read_json

TOL = 1e-5
LENGTH = 16
VISION = dict(
  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TEXT = dict(
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=LENGTH,
  bos_token_id=hf_models.BOS,
)
CLIP_EOS = hf_models.PAD  # CLIP's end-of-text pads too; 2 would be the legacy argmax pooling


def save_clip(directory: str) -> transformers.CLIPModel:
  """vocab 100 > the tokenizer's: <image> fits without growing the embedding. Its text tower
  has another activation than the family's."""
  hf_models.save_tokenizer(directory, image=False, template=None)
  hf_models.edit_json(os.path.join(directory, "tokenizer_config.json"), eos_token="<pad>")
  config = transformers.CLIPConfig(
    vision_config=VISION,
    projection_dim=24,
    text_config=dict(TEXT, vocab_size=100, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS, hidden_act="gelu"),
  )
  model = hf_models.randomize(transformers.CLIPModel(config), seed=1)
  model.save_pretrained(directory)
  return model


def save_siglip(directory: str) -> transformers.SiglipModel:
  """vocab == the tokenizer's: the embedding gains a row for <image>."""
  words = hf_models.save_tokenizer(directory, image=False, template=None).get_vocab_size()
  config = transformers.SiglipConfig(
    vision_config=VISION,
    text_config=dict(TEXT, vocab_size=words, eos_token_id=hf_models.EOS, pad_token_id=hf_models.PAD),
  )
  model = hf_models.randomize(transformers.SiglipModel(config), seed=2)
  model.save_pretrained(directory)
  return model


SAVERS = {"clip": save_clip, "siglip": save_siglip}


@pytest.fixture(scope="module", params=list(SAVERS))
def hf(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param))
  model = SAVERS[request.param](directory)
  return dict(family=request.param, dir=directory, model=model, vocab=model.config.text_config.vocab_size)


def pooled(out) -> np.ndarray:
  """get_*_features: a tensor, or in transformers 5 a ModelOutput holding it as pooler_output."""
  return (out if isinstance(out, torch.Tensor) else out.pooler_output).detach().numpy()


def inputs(vocab: int, eos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
  """Normalised pixels [2, 3, 32, 32]; ids [2, LENGTH] with EOS inside (first at 5 and 9; row 0 again at 12)."""
  g = torch.Generator().manual_seed(3)
  pixels = torch.randn(2, 3, 32, 32, generator=g)
  ids = torch.randint(4, vocab, (2, LENGTH), generator=g)
  if eos is not None:
    ids[0, 5] = ids[0, 12] = ids[1, 9] = eos
  return pixels, ids


def features(model, params, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
  image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_features"))
  text = jax.jit(lambda p, t: model.apply({"params": p}, t, method="text_features"))
  return np.asarray(image(params, pixels.numpy().transpose(0, 2, 3, 1))), np.asarray(text(params, ids.numpy()))


def hf_features(model, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
  with torch.no_grad():
    return pooled(model.get_image_features(pixel_values=pixels)), pooled(model.get_text_features(input_ids=ids))


def assert_features_match(hf_model, run, params, ids: torch.Tensor, pixels: torch.Tensor) -> None:
  got, expected = features(run.model, params, pixels, ids), hf_features(hf_model, pixels, ids)
  for name, a, b in zip(("image", "text"), got, expected):
    assert a.shape == b.shape, name
    err = float(np.abs(a - b).max())
    print(f"{name} features: max abs error {err:.1e} (values up to {np.abs(b).max():.1f})")
    assert err < TOL, name


# --- 1. Features and logit parameters against transformers ----------------------------------
def test_features_and_logit_params_match_transformers(hf):
  config, tokenizer, run, params, _, _ = contrastive.open_hf(hf["dir"])
  assert config.task == "contrastive" and config.model.dtype == "float32"
  m = config.model
  assert (m.vision.depth, m.text.depth, m.text.max_len, config.data.seq_len) == (2, 2, LENGTH, LENGTH)
  pixels, ids = inputs(hf["vocab"], CLIP_EOS if hf["family"] == "clip" else None)
  assert_features_match(hf["model"], run, params, ids, pixels)
  scale = float(hf["model"].logit_scale.detach().reshape(()))
  assert float(params["logit_scale"]) == scale
  if hf["family"] == "siglip":
    assert float(params["logit_bias"]) == float(hf["model"].logit_bias.detach().reshape(()))
    # The tokenizer filled the vocabulary: <image> took a new row, the mean of the others.
    assert tokenizer.image_id == hf["vocab"] and m.text.vocab_size == hf["vocab"] + 1
    embedding = np.asarray(params["text"]["embed"]["embedding"])
    np.testing.assert_allclose(embedding[-1], embedding[:-1].mean(0), rtol=1e-5)
  else:
    assert "logit_bias" not in params and m.contrastive.embed_dim == 24 and m.text.vocab_size == hf["vocab"]
    assert (m.text.pool, m.text.eos_id, m.text.act, m.vision.act) == ("", CLIP_EOS, "gelu", "")


def test_legacy_clip_eos_pools_the_highest_id(tmp_path):
  """eos_token_id 2: transformers' CLIP reads the highest id, not the first EOS."""
  save_clip(str(tmp_path))
  hf_models.edit_json(os.path.join(tmp_path, "config.json"), **{"text_config.eos_token_id": 2})
  hf_model = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
  config, _, run, params, _, _ = contrastive.open_hf(str(tmp_path))
  assert config.model.text.pool == "argmax"
  pixels, ids = inputs(100, CLIP_EOS)  # the first EOS is not the highest id: the pools differ
  assert_features_match(hf_model, run, params, ids, pixels)
  assert contrastive.model_to_hf(config.model)["text_config"]["eos_token_id"] == 2


# --- 2. Round trip through the CLI --------------------------------------------------------------
def test_cli_round_trip_keeps_tensors_and_exports_load_in_transformers(hf, tmp_path):
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  assert cli.main(["convert", "--from-hf", hf["dir"], "--out", work]) == 0
  saved = read_json(work)
  assert saved["task"] == "contrastive" and saved["data"]["tokenizer"] == "hf"
  assert Tokenizer.load(os.path.join(work, "hf")).image_id >= 0  # what training loads
  assert cli.main(["convert", "--checkpoint", work, "--to-hf", out]) == 0

  original, exported = read_all(hf["dir"]), read_all(out)
  assert sorted(original) == sorted(exported)
  grown = "text_model.embeddings.token_embedding.weight"
  for key, x in original.items():
    y = exported[key][: hf["vocab"]] if key == grown else exported[key]  # siglip: + the <image> row
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), key
  hc = read_json(out)
  assert hc["architectures"] == [hf["model"].__class__.__name__] and hc["model_type"] == hf["family"]

  # transformers loads the export and gives the original's features (ids the original knows).
  cls = type(hf["model"])
  pixels, ids = inputs(hf["vocab"], CLIP_EOS if hf["family"] == "clip" else None)
  for a, b in zip(hf_features(cls.from_pretrained(out).eval(), pixels, ids), hf_features(hf["model"], pixels, ids)):
    np.testing.assert_allclose(a, b, atol=TOL)
  text = "a photo of a cat on the mat"
  assert transformers.AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False).input_ids == Tokenizer.load(
    os.path.join(work, "hf")
  ).encode(text)

  # Import again: the same params, bit for bit; init_from reads the HF dir and the workdir alike.
  _, _, run, first, _, _ = contrastive.open_hf(hf["dir"])
  _, _, _, again, _, _ = contrastive.open_hf(out)
  for source in (again, dispatch.load_params(hf["dir"], run), dispatch.load_params(work, run)):
    flat = flat_params(source)
    for path, x in flat_params(first).items():
      assert np.asarray(x).tobytes() == np.asarray(flat[path]).tobytes(), path


# --- 3. What we cannot represent: one line naming the field -------------------------------------
def edited_copy(hf: dict, tmp_path, *, drop: tuple[str, ...] = (), tokenizer: dict | None = None, **config) -> str:
  directory = str(tmp_path / "edited")
  shutil.copytree(hf["dir"], directory)
  if drop:
    hf_models.rewrite_keys(directory, renames=(), drop=drop)
  if config:
    hf_models.edit_json(os.path.join(directory, "config.json"), **config)
  if tokenizer:
    hf_models.edit_json(os.path.join(directory, "tokenizer_config.json"), **tokenizer)
  return directory


BAD = {  # family -> (what is wrong, the words the line must hold)
  "clip": [
    (dict(drop=("text_projection.weight",)), ("missing tensor text_projection.weight",)),
    ({"text_config.hidden_act": "relu2"}, ("text_config.hidden_act", "relu2")),
    (dict(tokenizer=dict(eos_token="</s>")), ("eos_token_id", f"{CLIP_EOS}", "id 2")),
    ({"text_config.eos_token_id": [3, 4]}, ("text_config.eos_token_id",)),
    ({"vision_config.image_size": [32, 48]}, ("vision_config.image_size",)),
  ],
  "siglip": [
    ({"vision_config.vision_use_head": False}, ("vision_config.vision_use_head",)),
    ({"text_config.projection_size": 16}, ("text_config.projection_size", "16", "32")),
    (
      dict(drop=("vision_model.head.attention.in_proj_weight",)),
      ("missing tensor vision_model.head.attention.in_proj_weight",),
    ),
    ({"vision_config.intermediate_size": 48}, ("vision_model.", "fc1.weight", "[64, 32]", "[48, 32]")),
    ({"model_type": "siglip2", "architectures": ["Siglip2Model"]}, ("Siglip2Model", "SiglipModel")),
  ],
}


def test_bad_hf_directories_are_one_line(hf, tmp_path, capsys):
  for i, (edit, words) in enumerate(BAD[hf["family"]]):
    out = tmp_path / f"out{i}"
    shutil.rmtree(tmp_path / "edited", ignore_errors=True)
    line = convert_error(capsys, "--from-hf", edited_copy(hf, tmp_path, **edit), "--out", str(out))
    assert all(w in line for w in words), (edit, line)
    assert not os.path.exists(out)  # nothing written


def test_a_directory_without_tokenizer_leaves_it_to_the_config(hf, tmp_path, caplog):
  directory = str(tmp_path / "no_tokenizer")
  shutil.copytree(hf["dir"], directory, ignore=shutil.ignore_patterns("tokenizer*"))
  work = str(tmp_path / "work")
  assert cli.main(["convert", "--from-hf", directory, "--out", work]) == 0
  assert "no tokenizer" in caplog.text and "config.data.tokenizer stays 'shapes'" in caplog.text
  saved = read_json(work)
  assert saved["data"]["tokenizer"] == "shapes" and saved["model"]["text"]["vocab_size"] == hf["vocab"]


def model_config(family: str, **changes) -> ml_collections.ConfigDict:
  config = config_lib.base()
  config.task = "contrastive"
  config.model.contrastive.family = family
  config.model.vision.final_norm = True
  if family == "clip":
    config.model.vision.update(flavour="clip", keep_cls=True)
  for key, value in changes.items():
    section, field = key.split("__")
    config.model[section][field] = value
  return config.model


@pytest.mark.parametrize(
  "family,changes,words",
  [
    ("siglip", dict(vision__final_norm=False), ("config.model.vision.final_norm",)),
    ("clip", dict(contrastive__loss="siglip"), ("config.model.contrastive.loss", "'siglip'")),
    ("clip", dict(text__pool="last"), ("config.model.text.pool", "'last'")),
    ("siglip", dict(text__pool="eos"), ("config.model.text.pool", "'eos'")),
    ("clip", dict(text__eos_id=2), ("config.model.text.eos_id", "argmax")),
  ],
)
def test_configs_transformers_cannot_hold_are_refused_on_export(family, changes, words):
  model_cfg = model_config(family, **changes)
  with pytest.raises(UserError) as e:
    contrastive.model_to_hf(model_cfg)
  assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
  assert contrastive.model_to_hf(model_config(family))["model_type"] == family  # the defaults are fine


def test_a_model_trained_here_exports_with_our_tokenizer(tmp_path):
  """No HF origin: config.json from our config alone, our sentencepiece tokenizer, float32."""
  config = config_lib.base()
  config.task = "contrastive"
  config.model.dtype = "float32"
  config.model.vision.update(
    flavour="clip", keep_cls=True, final_norm=True, image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64
  )
  config.model.contrastive.update(family="clip", embed_dim=16)
  config.model.text.update(width=32, depth=1, heads=2, mlp_dim=64, max_len=LENGTH)
  config.data.seq_len = LENGTH
  tokenizer = Tokenizer.load("shapes")
  build_lib.resolve_model_config(config, tokenizer.vocab_size, tokenizer.eos_id)
  run = build_lib.build(config, parallel.inference_mesh(), tokenizer.image_id)
  params = run.init_params(jax.random.key(0))
  out = str(tmp_path / "out")
  contrastive.export(config, tokenizer, params, None, out)
  model = transformers.CLIPModel.from_pretrained(out).eval()
  assert model.config.text_config.eos_token_id == tokenizer.eos_id
  pixels, ids = inputs(tokenizer.vocab_size, tokenizer.eos_id)
  for a, b in zip(
    features(run.model, params, pixels[:, :, :16, :16], ids), hf_features(model, pixels[:, :, :16, :16], ids)
  ):
    np.testing.assert_allclose(a, b, atol=TOL)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok("two shapes", add_special_tokens=False).input_ids == tokenizer.encode("two shapes")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "float32"
