"""ToMe in the ViT: token counts, bipartite matching, weighted merge, proportional attention; the
VLM reads the merged tokens and `vlm-jax tokens` reports them."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from vlm_jax import build as build_lib
from vlm_jax import cli
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.errors import UserError
from vlm_jax.models import token_merging as tome
from vlm_jax.models import vit as vit_lib
from vlm_jax.models.attention import attention
from vlm_jax.models.layers import Compute
from vlm_jax.models.vit import ViT
from vlm_jax.models.vlm import image_tokens

XLA = Compute(attention="xla")  # the reference path, which the merging blocks match exactly


def tiny_vision(**overrides):
  """4x4 patches (16 tokens, 17 with CLS), two blocks."""
  c = config_lib.base().model.vision
  c.update(dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64))
  c.update(overrides)
  return c


def images() -> jax.Array:
  return jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


@pytest.mark.parametrize("flavour,keep_cls", [("siglip", False), ("clip", True)])
def test_merging_loop_with_r_0_is_the_scanned_vit(flavour, keep_cls):
  cfg = tiny_vision(flavour=flavour, keep_cls=keep_cls, final_norm=True)
  x = images()
  params = jax.jit(ViT(cfg, jnp.float32, XLA).init)(jax.random.key(0), x)
  scanned = jax.jit(ViT(cfg, jnp.float32, XLA).apply)(params, x)
  looped = jax.jit(ViT(cfg, jnp.float32, XLA, merging=True).apply)(params, x)
  np.testing.assert_array_equal(looped, scanned)


def test_counts():
  assert tome.counts(16, 3, 4, 0) == [16, 13, 10, 7, 4]
  assert tome.counts(17, 3, 4, 1) == [17, 14, 11, 8, 5]  # the CLS is never merged
  assert tome.counts(16, 0, 3, 0) == [16] * 4
  # r above half the unprotected tokens: each block halves them (rounding the kept half up)
  assert tome.counts(16, 100, 3, 0) == [16, 8, 4, 2]
  assert tome.counts(17, 100, 3, 1) == [17, 9, 5, 3]
  assert tome.counts(7, 5, 2, 0) == [7, 4, 2]


@pytest.mark.parametrize(
  "flavour,keep_cls,r,expected", [("siglip", False, 3, 10), ("clip", True, 100, 5), ("clip", False, 2, 12)]
)
def test_vit_outputs_num_output_tokens(flavour, keep_cls, r, expected):
  cfg = tiny_vision(flavour=flavour, keep_cls=keep_cls, token_merging=r)
  vit = ViT(cfg, jnp.float32, XLA)
  init_out, params = jax.eval_shape(vit.init_with_output, jax.random.key(0), images())  # shapes only: fast
  out = jax.eval_shape(vit.apply, params, images())
  assert out.shape == init_out.shape == (2, expected, 32) == (2, vit_lib.num_output_tokens(cfg), 32)
  # the params are the scanned stack's, whether the blocks merge or not
  unmerged = jax.eval_shape(ViT(tiny_vision(flavour=flavour)).init, jax.random.key(0), images())
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, unmerged)


def test_proportional_attention_weighs_a_merged_token_as_its_copies():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 3, 2, 8))
  k, v = (jax.random.normal(kk, (2, 4, 2, 8)) for kk in keys[1:])
  duplicated = [0, 1, 2, 3, 1]  # token 1 twice
  full = tome.proportional_attention(q, k[:, duplicated], v[:, duplicated], jnp.ones((2, 5)))
  merged = tome.proportional_attention(q, k, v, jnp.array([[1.0, 2.0, 1.0, 1.0]] * 2))
  np.testing.assert_allclose(merged, full, rtol=1e-5, atol=1e-6)
  ones = tome.proportional_attention(q, k, v, jnp.ones((2, 4)))
  np.testing.assert_array_equal(ones, attention(q, k, v, causal=False, implementation="xla"))


def test_a_duplicated_pair_is_merged_by_weighted_mean():
  metric = jax.random.normal(jax.random.key(0), (1, 6, 8))
  metric = metric.at[:, 2].set(metric[:, 3])  # a-token 1 (index 2) is b-token 1 (index 3)
  matching = tome.bipartite_soft_matching(metric, 1, protected=0)
  assert matching.src.tolist() == [[1]] and matching.dst.tolist() == [[1]]
  assert matching.unmerged.tolist() == [[0, 2]]

  x = jax.random.normal(jax.random.key(1), (1, 6, 4))
  x = x.at[:, 2].set(x[:, 3])
  merged, size = tome.merge_weighted(x, jnp.ones((1, 6)), matching)
  # unmerged a-tokens (indices 0, 4), then the b-tokens (1, 3 holding 2, 5)
  np.testing.assert_array_equal(merged, x[:, [0, 4, 1, 3, 5]])
  np.testing.assert_array_equal(size, [[1, 1, 1, 2, 1]])

  sizes = jnp.array([[1.0, 1.0, 3.0, 2.0, 1.0, 1.0]])
  merged, size = tome.merge_weighted(x.at[:, 2].add(1.0), sizes, matching)
  np.testing.assert_allclose(merged[:, 3], x[:, 3] + 3.0 / 5.0, rtol=1e-6)
  np.testing.assert_array_equal(size, [[1, 1, 1, 5, 1]])


def test_a_protected_cls_is_never_merged():
  metric = jax.random.normal(jax.random.key(0), (1, 7, 8))
  metric = metric.at[:, 0].set(metric[:, 1])  # the CLS's best match is the best edge
  assert tome.bipartite_soft_matching(metric, 1, protected=0).src.tolist() == [[0]]
  matching = tome.bipartite_soft_matching(metric, 3, protected=1)  # every a-token but the CLS
  assert matching.unmerged.tolist() == [[0]]
  x = jax.random.normal(jax.random.key(1), (1, 7, 4))
  merged, size = tome.merge_weighted(x, jnp.ones((1, 7)), matching)
  np.testing.assert_array_equal(merged[:, 0], x[:, 0])
  assert merged.shape == (1, 4, 4) and float(size.sum()) == 7.0


def test_gradients_flow_through_merging_blocks_under_jit():
  cfg = tiny_vision(flavour="clip", keep_cls=True, token_merging=3)
  x = images()
  params = nn.unbox(jax.jit(ViT(cfg, jnp.float32, XLA).init)(jax.random.key(0), x))

  def grads(compute):
    loss = lambda p: jnp.sum(ViT(cfg, jnp.float32, compute).apply(p, x) ** 2)
    return jax.jit(jax.grad(loss))(params)["params"]["layers"]

  g = grads(XLA)
  for name in ("q", "k"):
    kernel = np.asarray(g[name]["kernel"])
    assert np.isfinite(kernel).all()
    assert (np.abs(kernel).reshape(cfg.depth, -1).max(axis=1) > 0).all()  # every block's
  remat = grads(Compute(attention="xla", remat="full"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat, g)


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"model.vision.token_merging": -1}, "config.model.vision.token_merging must be >= 0"),
    ({"model.vision.token_merging": 2, "model.bridge.kind": "pixel_shuffle"}, "the pixel_shuffle bridge reads"),
    ({"model.vision.token_merging": 2, "model.anyres.enabled": True}, "AnyRes reads"),
  ],
)
def test_bad_token_merging_config_is_one_line(overrides, message):
  with pytest.raises(UserError, match=message) as e:
    config = helpers.tiny_config({"model.llm.vocab_size": 64, **overrides})
    build_lib.build(config, parallel.inference_mesh(), 63)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("bridge", ["mlp2x_gelu", "perceiver"])
def test_the_vlm_reads_the_merged_tokens(bridge):
  """4x4 patches merging 4 a block over 2 blocks: 16 -> 12 -> 8 tokens an image, the placeholders
  the data writes and the visual tokens the model scatters (a wrong count fails the scatter check)."""
  config = helpers.tiny_config(
    {
      "model.llm.vocab_size": 64,
      "model.vision.patch_size": 4,
      "model.vision.depth": 2,
      "model.vision.token_merging": 4,
      "model.bridge.kind": bridge,
      "model.bridge.num_latents": 4,
    }
  )
  run = build_lib.build(config, parallel.inference_mesh(), 63)
  params = run.init_params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 1, 16, 16, 3))
  visual = run.model.apply({"params": params}, x, method="encode_images")
  expected = 8 if bridge == "mlp2x_gelu" else 4
  assert image_tokens(config.model) == expected == visual.shape[1]
  plain = dict(config.model.vision.to_dict(), token_merging=0)
  assert vit_lib.num_output_tokens(ml_collections.ConfigDict(plain)) == 16


@pytest.mark.parametrize(
  "flags,sequence,visual",
  [
    ([], 16, 16),
    (["--config.model.vision.token_merging=4"], 8, 8),  # 16 -> 12 -> 8 over shapes_tiny's 2 blocks
    (
      [
        "--config.model.vision.token_merging=4",
        "--config.model.fusion=cross_attention",
        "--config.model.bridge.kind=perceiver",
        "--config.model.bridge.num_latents=6",
      ],
      1,
      6,
    ),
  ],
)
def test_tokens_command_reports_merged_and_cross_attention_counts(flags, sequence, visual, capsys):
  config = str(pathlib.Path(__file__).parent.parent / "configs" / "shapes_tiny.py")
  assert cli.main(["tokens", "--config", config, "--image-size", "300x500", "--json", *flags]) == 0
  out = json.loads(capsys.readouterr().out)
  assert (out["image_tokens"], out["tile_tokens"]) == (sequence, visual)
