"""Model-level properties: token counts, placeholder scatter, causality, segment isolation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax.errors import UserError
from vlm_jax.models import bridge as bridge_lib
from vlm_jax.models import vit as vit_lib
from vlm_jax.models.bridge import make_bridge
from vlm_jax.models.llm import LLM
from vlm_jax.models.vit import ViT
from vlm_jax.models.vlm import VLM, image_tokens, scatter_visual


def tiny_model_config(**vision):
  c = config_lib.base().model
  c.dtype = "float32"
  c.vision.update(dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64))
  c.vision.update(vision)
  c.llm.update(dict(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64))
  return c


@pytest.mark.parametrize("flavour,keep_cls,expected", [("siglip", False, 4), ("clip", False, 4), ("clip", True, 5)])
def test_vit_token_count(flavour, keep_cls, expected):
  cfg = tiny_model_config(flavour=flavour, keep_cls=keep_cls).vision
  vit = ViT(cfg, jnp.float32)
  images = jnp.ones((2, 16, 16, 3))
  out, params = vit.init_with_output(jax.random.key(0), images)
  assert out.shape == (2, expected, 32) == (2, vit_lib.num_output_tokens(cfg), 32)
  assert ("cls" in params["params"]) == (flavour == "clip")


@pytest.mark.parametrize("kind,tokens", [("linear", 4), ("mlp2x_gelu", 4), ("perceiver", 3)])
def test_bridge_output(kind, tokens):
  c = tiny_model_config()
  c.bridge.update(dict(kind=kind, num_latents=3, depth=1, heads=2))
  out, _ = make_bridge(c.bridge, 48, jnp.float32).init_with_output(jax.random.key(0), jnp.ones((2, 4, 32)))
  assert out.shape == (2, tokens, 48)
  assert image_tokens(c) == tokens


def test_mlp_bridge_uses_exact_gelu():
  c = tiny_model_config()
  bridge = make_bridge(c.bridge, 8, jnp.float32)
  x = jax.random.normal(jax.random.key(1), (1, 2, 32))
  out, variables = bridge.init_with_output(jax.random.key(0), x)
  p = nn.meta.unbox(variables["params"])
  h = x @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
  expected = jax.nn.gelu(h, approximate=False) @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


class PairPool(bridge_lib.Linear):
  """A bridge defined outside the package: neighbouring patches averaged in pairs, then projected."""

  def __call__(self, x):
    return super().__call__((x[:, 0::2] + x[:, 1::2]) / 2)


def test_a_bridge_is_one_registry_entry(monkeypatch):
  """Registering a kind is all it takes: validation, token counts and the VLM follow the registry."""
  cfg = config_lib.base()
  cfg.model = tiny_model_config()
  cfg.model.bridge.kind = "pair_pool"
  with pytest.raises(UserError, match="bridge.kind: 'pair_pool' is not one of linear, mlp2x_gelu, perceiver"):
    build_lib.validate(cfg)
  # A set of tokens (no grid): the tiny ViT's 4 patches give 2.
  monkeypatch.setitem(bridge_lib.BRIDGES, "pair_pool", bridge_lib.BridgeKind(PairPool, None, queries=lambda c: 2))
  build_lib.validate(cfg)
  assert image_tokens(cfg.model) == 2  # 4 patches, in pairs
  tokens = jnp.array([[5, 63, 63, 7]])  # two placeholders (id 63) for one image
  model = VLM(cfg.model, 63)
  logits, params = model.init_with_output(
    jax.random.key(0), tokens, jnp.ones((1, 1, 16, 16, 3)), jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32)
  )
  assert logits.shape == (1, 4, 64) and set(params["params"]["bridge"]) == {"linear_1"}
  cfg.model.anyres.enabled = True  # AnyRes tiles a grid of tokens, which this bridge does not yield
  with pytest.raises(UserError, match="yields a grid of tokens .*not pair_pool"):
    build_lib.validate(cfg)


def test_scatter_visual_fills_placeholders_in_order():
  embeds = jnp.zeros((2, 6, 1))
  visual = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1)
  is_placeholder = jnp.array([[0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0]], bool)
  out = scatter_visual(embeds, visual, is_placeholder)[..., 0]
  np.testing.assert_array_equal(out, [[0, 1, 2, 3, 0, 0], [4, 0, 5, 0, 0, 0]])


def _llm_and_params(length=8):
  cfg = tiny_model_config().llm
  llm = LLM(cfg, jnp.float32)
  tokens = jnp.arange(2 * length).reshape(2, length) % 64
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  # Init through embed + __call__: with an untied head, __call__ alone never creates the embedding.
  params = llm.init(
    jax.random.key(0),
    tokens,
    positions,
    jnp.ones((2, length), jnp.int32),
    method=lambda m, t, p, s: m(m.embed(t), p, s),
  )

  def logits(tokens, positions, segment_ids):
    embeds = llm.apply(params, tokens, method=LLM.embed)
    return llm.apply(params, embeds, positions, segment_ids)

  return logits, tokens, positions


def test_llm_is_causal():
  logits, tokens, positions = _llm_and_params()
  seg = jnp.ones_like(tokens)
  changed = tokens.at[:, 5:].set(7)
  np.testing.assert_allclose(
    logits(tokens, positions, seg)[:, :5], logits(changed, positions, seg)[:, :5], rtol=1e-5, atol=1e-6
  )
  assert not np.allclose(logits(tokens, positions, seg)[:, 5:], logits(changed, positions, seg)[:, 5:])


def test_packed_segments_do_not_attend_across():
  """Two samples packed in one row (segment ids 1, 2; positions restarted) give the logits each
  gets alone: the attention mask honours segment ids."""
  logits, tokens, _ = _llm_and_params()
  a, b = tokens[0, :5], tokens[1, :3]
  packed = jnp.concatenate([a, b])[None]
  packed_pos = jnp.concatenate([jnp.arange(5), jnp.arange(3)])[None]
  packed_seg = jnp.array([[1] * 5 + [2] * 3])
  out = logits(packed, packed_pos, packed_seg)[0]
  alone_a = logits(a[None], jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))[0]
  alone_b = logits(b[None], jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32))[0]
  np.testing.assert_allclose(out[:5], alone_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[5:], alone_b, rtol=1e-5, atol=1e-5)


def test_vlm_logits_depend_on_image_only_through_placeholders():
  c = tiny_model_config()
  image_id = 3
  model = VLM(c, image_id)
  n = image_tokens(c)
  tokens = jnp.array([[1] + [image_id] * n + [5, 6, 7]])
  length = tokens.shape[1]
  positions, seg = jnp.arange(length)[None], jnp.ones((1, length), jnp.int32)
  images = jax.random.normal(jax.random.key(1), (1, 1, 16, 16, 3))
  params = model.init(jax.random.key(0), tokens, images, positions, seg)
  out = model.apply(params, tokens, images, positions, seg)
  other = model.apply(params, tokens, images * -1.0, positions, seg)
  assert not np.allclose(out[:, -1], other[:, -1])  # the answer sees the image
  np.testing.assert_allclose(out[:, 0], other[:, 0], rtol=1e-6)  # BOS precedes it (causal)
  text_only = jnp.array([[1, 8, 5, 6, 7]])
  pos5, seg5 = jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32)
  np.testing.assert_allclose(
    model.apply(params, text_only, images, pos5, seg5),
    model.apply(params, text_only, images * -1.0, pos5, seg5),
    rtol=1e-6,
  )


class _Scaled(nn.Module):
  """A block whose __call__ takes a broadcast input, and a field the one-by-one mode sets."""

  compute: object
  width: int
  shift: float = 0.0

  @nn.compact
  def __call__(self, x, scale):
    return x + scale * jnp.tanh(nn.Dense(self.width, name="q")(x)) + self.shift, None


@pytest.mark.parametrize(
  "call",
  [dict(inserts={1: lambda x: 2 * x, 3: jnp.sin}), dict(one_by_one={}), dict(one_by_one={"shift": 0.5})],
  ids=["inserts", "one_by_one", "fields"],
)
def test_layer_stack_runs_slices_of_one_stacked_tree(call):
  """Run in slices (between inserts, one layer at a time) the stack keeps one stacked params tree,
  the scanned one (same paths, shapes and init), and computes what a loop over its layers does."""
  from vlm_jax.models.layers import Compute, LayerStack

  class Top(nn.Module):
    kwargs: dict

    @nn.compact
    def __call__(self, x):
      stack = LayerStack(_Scaled, 4, Compute(), n_broadcast=1, fields={"width": 8}, name="layers")
      return stack(x, 0.5, **self.kwargs)[0]

  x = jax.random.normal(jax.random.key(1), (2, 8))
  scanned = Top({}).init(jax.random.key(0), x)["params"]
  sliced = Top(call).init(jax.random.key(0), x)["params"]
  assert (
    jax.tree.map(jnp.shape, sliced)
    == jax.tree.map(jnp.shape, scanned)
    == {"layers": {"q": {"kernel": (4, 8, 8), "bias": (4, 8)}}}
  )
  jax.tree.map(np.testing.assert_array_equal, sliced, scanned)
  q = scanned["layers"]["q"]
  expected = x
  for i in range(4):
    expected = call.get("inserts", {}).get(i, lambda v: v)(expected)
    expected = (
      expected + 0.5 * jnp.tanh(expected @ q["kernel"][i] + q["bias"][i]) + call.get("one_by_one", {}).get("shift", 0.0)
    )
  np.testing.assert_allclose(Top(call).apply({"params": scanned}, x), expected, rtol=1e-5, atol=1e-6)
