"""Cross-attention fusion (Flamingo): zero gates are the LLM alone, media masking holds, stage 1
trains only the new blocks and the resampler, sharded == one device, and the KV-cache decode
equals uncached recomputation with several images a prompt."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import helpers
import hf_models
import test_train
import vlm_jax
from vlm_jax import build as build_lib
from vlm_jax import cli, parallel
from vlm_jax.build import flat_params
from vlm_jax.convert import hf_config
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer.generate import Generator
from vlm_jax.models import fusion
from vlm_jax.models.layers import Compute
from vlm_jax.models.llm import LLM
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.optim import component

VOCAB, IMAGE_ID, PAD = 64, 63, 0
FUSION = {
  "model.fusion": "cross_attention",
  "model.bridge.kind": "perceiver",
  "model.bridge.num_latents": 4,
  "model.llm.depth": 3,
}
T = 24
CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "shapes_tiny.py")
IMAGE_AT = (6, 11, 17)  # each row's three <image> markers


def _run(overrides=None):
  config = helpers.tiny_config({"model.llm.vocab_size": VOCAB, **FUSION, **(overrides or {})})
  return config, build_lib.build(config, parallel.inference_mesh(), IMAGE_ID)


def _open_gates(params, value: float = 0.8):
  """Trained-looking gates: tanh(value) instead of the initial 0."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x + value if "gate" in jax.tree_util.keystr(path) else x, params
  )


def _batch(rows: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, IMAGE_ID, (rows, T)).astype(np.int32)
  tokens[:, list(IMAGE_AT)] = IMAGE_ID
  images = rng.normal(size=(rows, len(IMAGE_AT), 16, 16, 3)).astype(np.float32)
  positions = np.tile(np.arange(T, dtype=np.int32), (rows, 1))
  return tokens, images, positions, np.ones((rows, T), np.int32)


def test_media_ids_follow_the_latest_image_of_the_segment():
  tokens = np.array([[5, IMAGE_ID, 5, 5, IMAGE_ID, 5, 5, IMAGE_ID, 5, 0]])
  segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
  np.testing.assert_array_equal(fusion.media_ids(tokens, IMAGE_ID), [[0, 1, 1, 1, 2, 2, 2, 3, 3, 3]])
  # A packed sample never reads the image of the sample before it; padding reads nothing.
  np.testing.assert_array_equal(fusion.media_ids(tokens, IMAGE_ID, segments), [[0, 1, 1, 1, 2, 0, 0, 3, 3, 0]])


def test_zero_gates_are_the_llm_alone():
  config, run = _run({"model.cross_attention.every": 2, "model.llm.depth": 4})
  assert fusion.block_layers(config.model) == (1, 3)
  params = run.init_params(jax.random.key(0))
  tokens, images, positions, segments = _batch()
  fused = np.asarray(run.model.apply({"params": params}, tokens, images, positions, segments))
  llm = LLM(config.model.llm, jnp.float32, Compute.of(config.model))
  x = llm.apply({"params": params["llm"]}, tokens, method="embed")
  alone = np.asarray(llm.apply({"params": params["llm"]}, x, positions, segments))
  np.testing.assert_allclose(fused, alone, rtol=1e-6, atol=1e-6)
  # The same model with its gates open reads the images.
  opened = np.asarray(run.model.apply({"params": _open_gates(params)}, tokens, images, positions, segments))
  assert np.abs(opened - alone)[:, IMAGE_AT[0] :].min(axis=-1).max() > 1e-3


def _perturbed(images, k):
  out = images.copy()
  out[:, k] += 1.0
  return out


def test_media_masking_in_the_logits():
  """Tokens before the first image read no image; a token after image k reads no later image
  (and does read image k). Earlier images reach it through the LLM's self-attention over the
  tokens that read them, as in Flamingo, so the block-level test below checks those."""
  _, run = _run()
  params = _open_gates(run.init_params(jax.random.key(0)))
  tokens, images, positions, segments = _batch()
  forward = jax.jit(lambda im: run.model.apply({"params": params}, tokens, im, positions, segments))
  base = np.asarray(forward(images))
  spans = list(zip(IMAGE_AT, IMAGE_AT[1:] + (T,)))
  for k in range(len(IMAGE_AT)):
    out = np.asarray(forward(_perturbed(images, k)))
    np.testing.assert_array_equal(out[:, : IMAGE_AT[0]], base[:, : IMAGE_AT[0]], err_msg=f"image {k}")
    lo, hi = spans[k]
    np.testing.assert_array_equal(out[:, :lo], base[:, :lo], err_msg=f"image {k} reached earlier tokens")
    assert np.abs(out[:, lo:hi] - base[:, lo:hi]).min(axis=-1).min() > 0, f"image {k} unread after it"


def test_media_masking_in_a_block():
  """A block's output for a token after image k changes with image k and with no other."""
  config, run = _run()
  params = _open_gates(run.init_params(jax.random.key(0)))
  tokens, images, _, _ = _batch()
  x = np.random.default_rng(1).normal(size=(2, T, config.model.llm.width)).astype(np.float32)
  block = fusion.GatedCrossAttention(fusion.block_config(config.model), config.model.llm.width, jnp.float32)

  def block_out(im):
    media = run.model.apply({"params": params}, im, method="encode_media")
    b, n, per_image, width = media.shape
    media = media.reshape(b, n * per_image, width)
    p = {"params": params["xattn_0"]}
    kv = block.apply(p, media, method="media_kv")
    return np.asarray(block.apply(p, x, kv, fusion.media_ids(tokens, IMAGE_ID), fusion.key_ids(n, per_image, b)))

  base = block_out(images)
  spans = list(zip(IMAGE_AT, IMAGE_AT[1:] + (T,)))
  for k in range(len(IMAGE_AT)):
    out = block_out(_perturbed(images, k))
    for j, (lo, hi) in enumerate(spans):
      if j == k:
        assert np.abs(out[:, lo:hi] - base[:, lo:hi]).min(axis=-1).min() > 0
      else:
        np.testing.assert_array_equal(out[:, lo:hi], base[:, lo:hi], err_msg=f"span {j}, image {k}")
    np.testing.assert_array_equal(out[:, : IMAGE_AT[0]], base[:, : IMAGE_AT[0]])


# --- Training: stage 1 trains the blocks and the resampler only; sharded == one device ----------


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def _train_config(tok, overrides=None):
  return test_train.make_config(tok, {**FUSION, **(overrides or {})})


def test_stage1_trains_only_the_blocks_and_the_resampler(tok):
  config = _train_config(tok, {"stage": "stage1"})
  run = trainer_lib.build(config, test_train.single_device_mesh(config), tok.image_id)
  batches = [helpers.random_batch(seed, config, tok.image_id) for seed in range(3)]
  assert all((b["tokens"] == tok.image_id).sum(axis=1).max() == 1 for b in batches)  # one marker an image
  state = run.init(jax.random.key(0))
  # Open gates, so that the blocks' own weights get gradients from the first step.
  state["params"] = jax.device_put(_open_gates(state["params"]), run.state_shardings["params"])
  init = helpers.to_host(state["params"])
  state, metrics = test_train.train_steps(run, state, batches)
  final = helpers.to_host(state["params"])
  assert all(np.isfinite(m["train/loss"]) for m in metrics)
  trains = {"bridge"}
  assert {component(p) for p in flat_params(init) if p.startswith("xattn_")} == trains
  test_train.check_frozen_and_trained(init, final, trains)
  test_train.check_optimizer_state(run, trains)
  for path in flat_params(init):
    if path.startswith("xattn_"):
      assert not np.array_equal(flat_params(final)[path], flat_params(init)[path]), path


def _grads(config, mesh, params, batch, image_id):
  run = build_lib.build(config, mesh, image_id)
  placed, on_mesh = jax.device_put(params, run.param_shardings), parallel.global_batch(batch, mesh)
  with build_lib.tracing_context(mesh):
    grads = jax.jit(jax.grad(lambda p: run.task.loss(run.model.apply, p, on_mesh)[0]))(placed)
  return helpers.to_host(grads)


def test_sharded_step_matches_single_device(tok):
  """Gradients on a (2,2,2) data x fsdp x tensor mesh == one device's, and two train steps give
  the same losses and gradient norms (params after Adam are compared in test_train.py)."""
  config = _train_config(tok)
  batches = [helpers.random_batch(seed, config, tok.image_id) for seed in range(2)]
  one = trainer_lib.build(config, test_train.single_device_mesh(config), tok.image_id)
  state = one.init(jax.random.key(0))
  state["params"] = jax.device_put(_open_gates(state["params"]), one.state_shardings["params"])
  init = helpers.to_host(state)
  split_config = _train_config(tok, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = parallel.make_mesh(split_config.mesh)
  expected = _grads(config, one.run.mesh, init["params"], batches[0], tok.image_id)
  actual = _grads(split_config, mesh, init["params"], batches[0], tok.image_id)
  for path, g in flat_params(expected).items():
    if path not in test_train.NOISE_ONLY:
      np.testing.assert_allclose(flat_params(actual)[path], g, rtol=0, atol=5e-5 * np.abs(g).max(), err_msg=path)
  _, one_metrics = test_train.train_steps(one, state, batches)
  split = trainer_lib.build(split_config, mesh, tok.image_id)
  _, split_metrics = test_train.train_steps(split, jax.device_put(init, split.state_shardings), batches)
  # Step 2's gradient norm: after one Adam step, whose near-zero, rounding-level gradients (see
  # test_train.NOISE_ONLY) moved their params by up to lr either way.
  for a, b, rtol in zip(split_metrics, one_metrics, (1e-5, 1e-4)):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], **test_train.LOSS_TOL)
    np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=rtol)


# --- Generation ---------------------------------------------------------------------------------


def _uncached(run, params, prompt, images, new):
  total = len(prompt) + new
  forward = jax.jit(
    lambda p, t: run.model.apply({"params": p}, t, images[None], np.arange(total)[None], np.ones((1, total), np.int32))
  )
  tokens = np.zeros((1, total), np.int32)
  tokens[0, : len(prompt)] = prompt
  for n in range(len(prompt), total):
    tokens[0, n] = int(np.argmax(np.asarray(forward(params, tokens))[0, n - 1]))
  return tokens[0, len(prompt) :].tolist()


def test_cached_decoding_with_several_images_equals_uncached():
  config, run = _run()
  params = jax.tree.map(lambda x: x * 3, _open_gates(run.init_params(jax.random.key(1))))
  rng = np.random.default_rng(0)
  # Rows with 0, 1 and 2 images, of different lengths (left padding differs per row).
  prompts = [
    np.asarray([1] + rng.integers(3, IMAGE_ID, 5).tolist(), np.int32),
    np.asarray([1, IMAGE_ID] + rng.integers(3, IMAGE_ID, 8).tolist(), np.int32),
    np.asarray([1, IMAGE_ID, 7, 9, IMAGE_ID] + rng.integers(3, IMAGE_ID, 3).tolist(), np.int32),
  ]
  images = rng.normal(size=(3, 2, 16, 16, 3)).astype(np.float32)
  gen = Generator(run.model, run.mesh, pad_id=PAD, context=config.model.llm.max_len)
  out = gen(params, prompts, images, max_new_tokens=8)
  for i, prompt in enumerate(prompts):
    assert out[i] == _uncached(run, params, prompt, images[i], 8), i
  assert len({tuple(row) for row in out}) > 1


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"model.fusion": "concat"}, "config.model.fusion"),
    ({"model.cross_attention.every": 9}, "config.model.cross_attention.every"),
    ({"model.cross_attention.heads": -1}, "config.model.cross_attention.heads"),
    ({"model.anyres.enabled": True, "model.bridge.kind": "mlp2x_gelu"}, "AnyRes"),
  ],
)
def test_bad_fusion_config_is_one_line(overrides, message):
  with pytest.raises(UserError, match=message) as e:
    config = helpers.tiny_config({"model.llm.vocab_size": VOCAB, **FUSION, **overrides})
    build_lib.build(config, parallel.inference_mesh(), IMAGE_ID)
  assert "\n" not in str(e.value)


def test_an_assembled_flamingo_starts_as_its_hf_llm(tmp_path):
  """`convert --from-hf LLM --vision TOWER` with cross-attention fusion: fresh resampler and
  blocks beside the HF weights, and with its zero gates the model's logits are transformers' LLM's
  on the same ids (images and all); then its stage-1 run starts from it (init_from)."""
  hf_models.save_vision(str(tmp_path / "clip"), "clip", seed=8)
  hf_models.save_tokenizer(str(tmp_path / "llm"))
  hf = hf_models.save_llm(str(tmp_path / "llm"), "llama", seed=9)
  work = str(tmp_path / "work")
  fused = [f"--config.{k}={v}" for k, v in FUSION.items() if k != "model.llm.depth"]
  assert (
    cli.main(
      [
        "convert",
        "--from-hf",
        str(tmp_path / "llm"),
        "--vision",
        str(tmp_path / "clip"),
        "--out",
        work,
        "--config",
        CONFIG,
        *fused,
      ]
    )
    == 0
  )
  model = vlm_jax.load(work, dtype="float32")
  assert model.config.model.fusion == "cross_attention"
  assert {p.split("/")[0] for p in flat_params(model.params)} >= {"xattn_0", "bridge", "llm", "vision"}
  ids = np.asarray([[hf_models.BOS, model.tokenizer.image_id] + model.tokenizer.encode("what color is it")])
  images = np.random.default_rng(0).normal(size=(1, 1, 16, 16, 3)).astype(np.float32)
  ours = model.run.model.apply(
    {"params": model.params}, ids, images, np.arange(ids.shape[1])[None], np.ones(ids.shape, np.int32)
  )
  with torch.no_grad():
    expected = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


@pytest.mark.parametrize(
  "overrides,field",
  [
    ({"model.fusion": "cross_attention"}, "config.model.fusion"),
    ({"model.vision.token_merging": 1}, "config.model.vision.token_merging"),
  ],
)
def test_hf_llava_export_names_what_it_cannot_write(overrides, field):
  config = helpers.tiny_config({"model.llm.vocab_size": VOCAB, **overrides})
  with pytest.raises(UserError, match=field):
    hf_config.llava_to_hf(
      config.model, image_token_id=IMAGE_ID, llm_family="llama", vision_layers=2, has_vision_head=False
    )
