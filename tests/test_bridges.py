"""Bridges (config.model.bridge.kind): each equals its reference on the operations that define it
(pixel shuffle = space-to-depth, C-Abstractor's pooling = torch's adaptive average pooling; the
Q-Former = transformers' in test_qformer.py), stage 1 trains exactly the bridge, and a sharded
step equals the one-device step; bad fields are one-line config errors."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import helpers
from vlm_jax import build as build_lib
from vlm_jax import parallel
from vlm_jax.build import flat_params
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.models import bridge as bridge_lib
from vlm_jax.models.vlm import image_tokens
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.optim import FROZEN

# 32-px images of 8-px patches: a 4x4 grid; each kind's own token budget.
GRID = {"model.vision.image_size": 32}
KINDS = {
  "qformer": {
    "model.bridge.num_queries": 5,
    "model.bridge.width": 24,
    "model.bridge.depth": 3,
    "model.bridge.mlp_dim": 40,
  },
  "cabstractor": {"model.bridge.num_tokens": 9, "model.bridge.width": 24, "model.bridge.depth": 1},
  "pixel_shuffle": {"model.bridge.factor": 2, "model.bridge.projection": "mlp"},
  "perceiver": {"model.bridge.num_latents": 3},
}
TOKENS = {"qformer": 5, "cabstractor": 9, "pixel_shuffle": 4, "perceiver": 3}


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def config(tok, kind: str, overrides: dict | None = None):
  cfg = helpers.tiny_config({**GRID, "model.bridge.kind": kind, **KINDS[kind], **(overrides or {})})
  build_lib.resolve_model_config(cfg, tok.vocab_size)
  return cfg


# --- The operations against their references ----------------------------------------------------


def space_to_depth(x: np.ndarray, r: int) -> np.ndarray:
  """[B, S*S, D] -> [B, (S/r)^2, r*r*D], one output token at a time."""
  b, n, d = x.shape
  s = int(round(n**0.5))
  grid = x.reshape(b, s, s, d)
  out = np.zeros((b, (s // r) ** 2, r * r * d), x.dtype)
  for i in range(s // r):
    for j in range(s // r):
      out[:, i * (s // r) + j] = np.concatenate(
        [grid[:, r * i + dy, r * j + dx] for dy in range(r) for dx in range(r)], axis=-1
      )
  return out


@pytest.mark.parametrize("side,r", [(4, 2), (6, 3), (6, 2), (3, 1)])
def test_pixel_shuffle_is_space_to_depth(side, r):
  x = np.random.default_rng(side * r).normal(size=(2, side * side, 5)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(bridge_lib.pixel_shuffle(jnp.asarray(x), r)), space_to_depth(x, r))


def adaptive_pool_reference(x: np.ndarray, side: int) -> np.ndarray:
  """[B, H, W, D] -> [B, side, side, D]: each output the mean of its torch window."""
  b, h, w, d = x.shape
  out = np.zeros((b, side, side, d), np.float64)
  for i in range(side):
    for j in range(side):
      y0, y1 = (i * h) // side, -(-((i + 1) * h) // side)
      x0, x1 = (j * w) // side, -(-((j + 1) * w) // side)
      out[:, i, j] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize(
  "size,side", [((5, 5), 3), ((7, 7), 4), ((6, 6), 4), ((4, 4), 3), ((24, 24), 7), ((8, 8), 4), ((5, 7), 2)]
)
def test_adaptive_pooling_matches_numpy_and_torch(size, side):
  x = np.random.default_rng(sum(size)).normal(size=(2, *size, 3)).astype(np.float32)
  ours = np.asarray(bridge_lib.adaptive_avg_pool(jnp.asarray(x), side))
  np.testing.assert_allclose(ours, adaptive_pool_reference(x, side), rtol=1e-5, atol=1e-6)
  torch_out = torch.nn.AdaptiveAvgPool2d((side, side))(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(ours, torch_out.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS) + ["linear", "mlp2x_gelu"])
def test_each_kind_yields_the_tokens_it_counts(tok, kind):
  cfg = config(tok, kind) if kind in KINDS else helpers.tiny_config({**GRID, "model.bridge.kind": kind})
  n = image_tokens(cfg.model)
  assert n == TOKENS.get(kind, 16)
  module = bridge_lib.make_bridge(cfg.model.bridge, cfg.model.llm.width, jnp.float32)
  features = jnp.ones((2, 16, cfg.model.vision.width))
  out = module.apply(module.init(jax.random.key(0), features), features)
  assert out.shape == (2, n, cfg.model.llm.width)


# --- Training: stage 1 trains the bridge alone; sharded == one device ----------------------------


def train_steps(run, state, batches):
  losses = []
  for batch in batches:
    state, m = run.train_step(state, parallel.global_batch(batch, run.run.mesh))
    losses.append(float(m["train/loss"]))
  return helpers.to_host(state), losses


@pytest.mark.parametrize("kind", ["qformer", "cabstractor", "pixel_shuffle"])
def test_stage1_trains_only_the_bridge_and_shards_like_one_device(tok, kind):
  cfg = config(tok, kind, {"stage": "stage1"})
  batches = [helpers.random_batch(seed, cfg, tok.image_id) for seed in range(2)]
  one = trainer_lib.build(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]), tok.image_id)
  init = one.init(jax.random.key(cfg.seed))
  init_host = helpers.to_host(init)
  after_one, losses_one = train_steps(one, init, batches)

  sharded_cfg = config(tok, kind, {"stage": "stage1", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  sharded = trainer_lib.build(sharded_cfg, parallel.make_mesh(sharded_cfg.mesh), tok.image_id)
  state = sharded.init(jax.random.key(cfg.seed))
  init_sharded = flat_params(state["params"])
  for path, x in flat_params(init_host["params"]).items():  # the sharded init is the same init
    np.testing.assert_array_equal(np.asarray(init_sharded[path]), x, err_msg=path)
  # The bridge's params follow the logical-axis table: some are split over the mesh.
  bridge_split = [
    p for p, x in init_sharded.items() if p.startswith("bridge/") and any(s is not None for s in x.sharding.spec)
  ]
  assert bridge_split, "no bridge param is sharded"
  after_sharded, losses_sharded = train_steps(sharded, state, batches)
  np.testing.assert_allclose(losses_sharded, losses_one, rtol=1e-5)

  before, one_final, sharded_final = (flat_params(t["params"]) for t in (init_host, after_one, after_sharded))
  for path, x in before.items():
    if path.startswith("bridge/"):
      assert not np.array_equal(one_final[path], x), f"{path} should train"
    else:
      assert np.array_equal(one_final[path], x) and np.array_equal(sharded_final[path], x), f"{path} changed"
    if path.endswith("_k/bias"):  # a key bias cannot move softmax: its gradient is rounding noise
      np.testing.assert_allclose(sharded_final[path], one_final[path], rtol=0, atol=3 * cfg.train.lr, err_msg=path)
    else:
      np.testing.assert_allclose(sharded_final[path], one_final[path], rtol=1e-4, atol=1e-6, err_msg=path)
  # Adam moments for exactly the bridge's params.
  counts = collections.Counter(helpers.moment_paths(one.abstract_state["opt_state"]))
  assert set(counts) == {p for p in before if p.startswith("bridge/")}
  assert {p for p, label in flat_params(one.labels).items() if label != FROZEN} == set(counts)


# --- Config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "overrides,needle",
  [
    ({"model.bridge.kind": "pixel_shuffle", "model.bridge.factor": 3}, "factor (3) does not divide the ViT's 4x4"),
    ({"model.bridge.kind": "pixel_shuffle", "model.bridge.projection": "conv"}, "projection: 'conv'"),
    ({"model.bridge.kind": "cabstractor", "model.bridge.num_tokens": 8}, "num_tokens (8) must be a square"),
    ({"model.bridge.kind": "cabstractor", "model.bridge.num_tokens": 25}, "to a larger one (5x5)"),
    ({"model.bridge.kind": "qformer", "model.bridge.width": 30}, "bridge.width: 30 is not a multiple"),
    ({"model.bridge.kind": "qformer", "model.bridge.cross_attention_every": 0}, "cross_attention_every must be >= 1"),
    ({"model.bridge.kind": "perceiver", "model.bridge.heads": 5}, "llm.width (32) is not a multiple"),
    (
      {"model.bridge.kind": "pixel_shuffle", "model.vision.flavour": "clip", "model.vision.keep_cls": True},
      "keep_cls: the pixel_shuffle bridge reads the patch grid",
    ),
    ({"model.bridge.kind": "qformer", "model.anyres.enabled": True}, "needs a bridge that yields a grid"),
    ({"model.bridge.kind": "resampler"}, "'resampler' is not one of"),
  ],
)
def test_bad_bridge_fields_are_one_line_errors(overrides, needle):
  with pytest.raises(UserError) as e:
    helpers.tiny_config({**GRID, **overrides})
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
