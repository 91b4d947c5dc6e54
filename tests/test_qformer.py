"""The qformer bridge equals BLIP-2's Q-Former + language_projection in transformers, mapped by the
converter's own key table; a BLIP-2 directory imports as the bridge of an assembled model."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
import vlm_jax
from vlm_jax import cli
from vlm_jax import config as config_lib
from vlm_jax.build import flat_params
from vlm_jax.convert import params as params_lib, qformer
from vlm_jax.errors import UserError
from vlm_jax.models import bridge as bridge_lib

TOL = 1e-5
QUERIES = 5


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """O(1) activations everywhere: LayerNorm gains near 1 (HF spells some "LayerNorm"), biases
  and weights random, so that a wrong map cannot hide under the tolerance."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name.lower() else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
  return model.eval()


def bridge_cfg(**fields):
  cfg = config_lib.base().model.bridge
  cfg.update(fields)
  return cfg


def ours(cfg, params: dict, features: torch.Tensor, out_width: int) -> np.ndarray:
  tree = params_lib.unflatten({k[len("bridge/") :]: jnp.asarray(v) for k, v in params.items()})
  module = bridge_lib.make_bridge(cfg, out_width, jnp.float32)
  return np.asarray(module.apply({"params": tree}, jnp.asarray(features.numpy())))


def blip2_tokens(query_tokens, qformer_model, projection, features: torch.Tensor) -> np.ndarray:
  """BLIP-2's visual tokens for the LLM (Blip2ForConditionalGeneration.get_image_features)."""
  with torch.no_grad():
    q = qformer_model(
      query_embeds=query_tokens.expand(features.shape[0], -1, -1), encoder_hidden_states=features
    ).last_hidden_state
    return projection(q).numpy()


# --- 1. The module against transformers' Blip2QFormerModel -----------------------------------------
@pytest.mark.parametrize("layers,every", [(3, 2), (2, 1)])
def test_qformer_matches_transformers(layers, every):
  hc = transformers.Blip2QFormerConfig(
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=layers,
    intermediate_size=48,
    cross_attention_frequency=every,
    encoder_hidden_size=24,
  )
  hc._attn_implementation = "eager"
  torch.manual_seed(0)
  model = randomize(transformers.Blip2QFormerModel(hc), seed=1)
  projection = randomize(torch.nn.Linear(32, 40), seed=2)
  query_tokens = torch.randn(1, QUERIES, 32, generator=torch.Generator().manual_seed(3))
  features = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(4))
  state = {"qformer." + k: v.numpy() for k, v in model.state_dict().items()}
  state.update(
    {
      "query_tokens": query_tokens.numpy(),
      "language_projection.weight": projection.weight.detach().numpy(),
      "language_projection.bias": projection.bias.detach().numpy(),
    }
  )
  cfg = bridge_cfg(
    kind="qformer",
    num_queries=QUERIES,
    depth=layers,
    heads=4,
    width=32,
    mlp_dim=48,
    cross_attention_every=every,
    norm_eps=1e-12,
  )
  params = qformer.from_hf(state, cfg, vision_width=24, out_width=40)
  crosses = {k.split("/")[1] for k in params if "/cross_q/" in k}
  assert crosses == {f"layer_{i}" for i in range(0, layers, every)}
  expected = blip2_tokens(query_tokens, model, projection, features)
  got = ours(cfg, params, features, 40)
  assert got.shape == expected.shape == (2, QUERIES, 40)
  assert np.abs(expected).mean() > 0.1  # O(1) tokens: the tolerance below means something
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# --- 2. A Blip2ForConditionalGeneration directory ---------------------------------------------------
VISION_WIDTH, LLM_WIDTH = hf_models.VISION_KW["hidden_size"], hf_models.LLM_KW["hidden_size"]  # 32, 32
EXPECTED = dict(
  kind="qformer", num_queries=QUERIES, depth=3, heads=4, width=24, mlp_dim=48, cross_attention_every=2, norm_eps=1e-6
)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
  """A tiny BLIP-2 whose ViT and OPT are as wide as hf_models' CLIP and Llama."""
  directory = str(tmp_path_factory.mktemp("blip2"))
  config = transformers.Blip2Config(
    vision_config=dict(
      hidden_size=VISION_WIDTH,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=16,
      patch_size=8,
    ),
    qformer_config=dict(
      hidden_size=24,
      num_attention_heads=4,
      num_hidden_layers=3,
      intermediate_size=48,
      cross_attention_frequency=2,
      encoder_hidden_size=VISION_WIDTH,
      layer_norm_eps=1e-6,
    ),
    text_config=dict(
      model_type="opt",
      hidden_size=LLM_WIDTH,
      ffn_dim=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      vocab_size=40,
      word_embed_proj_dim=LLM_WIDTH,
      max_position_embeddings=16,
    ),
    num_query_tokens=QUERIES,
  )
  torch.manual_seed(0)
  model = randomize(transformers.Blip2ForConditionalGeneration(config), seed=5)
  model.save_pretrained(directory)
  return directory, model


def test_bridge_config_reads_the_qformer(blip2):
  assert qformer.bridge_config(blip2[0]) == EXPECTED


def test_read_bridge_matches_transformers(blip2):
  directory, model = blip2
  cfg = bridge_cfg(**qformer.bridge_config(directory))
  params = qformer.read_bridge(directory, cfg, VISION_WIDTH, LLM_WIDTH)
  assert all(v.dtype == np.float32 for v in params.values())
  features = torch.randn(2, 9, VISION_WIDTH, generator=torch.Generator().manual_seed(6))
  expected = blip2_tokens(model.query_tokens, model.qformer, model.language_projection, features)
  assert np.abs(expected).mean() > 0.1
  np.testing.assert_allclose(ours(cfg, params, features, LLM_WIDTH), expected, atol=TOL, rtol=0)


def test_read_bridge_with_a_prefixed_layout(blip2, tmp_path):
  """Keys under a wrapper ("model.query_tokens", ...) read the same."""
  directory = str(tmp_path / "prefixed")
  shutil.copytree(blip2[0], directory)
  hf_models.rewrite_keys(directory, renames=(("", "model."),))
  cfg = bridge_cfg(**EXPECTED)
  plain, prefixed = (qformer.read_bridge(d, cfg, VISION_WIDTH, LLM_WIDTH) for d in (blip2[0], directory))
  assert plain.keys() == prefixed.keys()
  for k in plain:
    np.testing.assert_array_equal(plain[k], prefixed[k], err_msg=k)


def test_missing_tensor(blip2, tmp_path):
  directory = str(tmp_path / "partial")
  shutil.copytree(blip2[0], directory)
  key = "qformer.encoder.layer.2.crossattention.attention.value.bias"
  hf_models.rewrite_keys(directory, renames=(), drop=(key,))
  with pytest.raises(UserError, match=f"missing tensor {key} .*layer_2/cross_v/bias"):
    qformer.read_bridge(directory, bridge_cfg(**EXPECTED), VISION_WIDTH, LLM_WIDTH)


def test_mismatched_widths(blip2, caplog):
  directory = blip2[0]
  cfg = bridge_cfg(**EXPECTED)
  with pytest.raises(UserError) as e:
    qformer.read_bridge(directory, cfg, 48, LLM_WIDTH)
  line = str(e.value)
  assert "\n" not in line and "encoder_hidden_size" in line and "32" in line and "48" in line
  with caplog.at_level("INFO", logger="vlm_jax"):
    params = qformer.read_bridge(directory, cfg, VISION_WIDTH, 40)  # BLIP-2's LLM is 32 wide
  assert not any(k.startswith("bridge/out_proj") for k in params)
  assert "bridge/query_tokens" in params and "bridge/layer_2/fc2/kernel" in params
  assert sum("language_projection" in r.getMessage() for r in caplog.records) == 1


def test_bad_blip2_configs(blip2, tmp_path):
  config = json.load(open(os.path.join(blip2[0], "config.json")))
  cases = (
    (dict(config, qformer_config=dict(config["qformer_config"], hidden_act="relu")), "hidden_act"),
    ({k: v for k, v in config.items() if k != "qformer_config"}, "qformer_config"),
  )
  for i, (data, field) in enumerate(cases):
    os.makedirs(tmp_path / str(i))
    with open(tmp_path / str(i) / "config.json", "w") as f:
      json.dump(data, f)
    with pytest.raises(UserError) as e:
      qformer.bridge_config(str(tmp_path / str(i)))
    line = str(e.value)
    assert "\n" not in line and field in line and "config.json" in line, line


# --- 3. `vlm-jax convert --from-hf LLM --vision CLIP --qformer BLIP2 --out OUT` ------------------------
def test_convert_cli_imports_the_qformer(blip2, tmp_path, capsys):
  hf_models.save_vision(str(tmp_path / "clip"), "clip", seed=8)
  hf_models.save_tokenizer(str(tmp_path / "llm"))
  hf_models.save_llm(str(tmp_path / "llm"), "llama", seed=9)
  work = str(tmp_path / "work")
  args = ["convert", "--from-hf", str(tmp_path / "llm"), "--vision", str(tmp_path / "clip")]
  capsys.readouterr()
  assert cli.main(args[:3] + ["--qformer", blip2[0], "--out", work]) == 2  # no --vision
  assert "--qformer needs --vision" in capsys.readouterr().err
  assert cli.main(args + ["--qformer", blip2[0], "--out", work]) == 0
  with open(os.path.join(work, "config.json")) as f:
    written = config_lib.from_json(f.read()).model.bridge
  assert {k: written[k] for k in EXPECTED} == EXPECTED
  model = vlm_jax.load(work, dtype="float32")
  got = flat_params({"bridge": model.params["bridge"]})
  expected = qformer.read_bridge(blip2[0], bridge_cfg(**EXPECTED), VISION_WIDTH, LLM_WIDTH)
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(np.asarray(got[k]), expected[k], err_msg=k)
