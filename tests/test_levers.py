"""Speed levers (config fields that change how, not what, the step computes): each gives the plain
path's loss and gradients, with packed rows, text-only rows, padding and AnyRes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from vlm_jax import build as build_lib
from vlm_jax import parallel, tasks
from vlm_jax.data import images as images_lib
from vlm_jax.data import llava_fixture
from vlm_jax.data.pipeline import Batches
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.losses import chunked_token_loss, token_loss
from vlm_jax.train import optim
from vlm_jax.train.step import trainable_part, with_frozen

PLAIN = {"model.attention": "xla", "model.scan_unroll": 1, "model.loss_chunk": 0}
# Blocks and chunks smaller than the rows (32 and 96 tokens), not dividing them.
LEVERS = {
  "blockwise attention": {"model.attention": "blockwise", "model.attention_block": 7},
  # Pallas kernels, in Pallas' interpreter on CPU (tests/test_attention.py: sliding window)
  "splash attention": {"model.attention": "splash"},
  "pallas_gpu attention": {"model.attention": "pallas_gpu"},
  "unrolled layers": {"model.scan_unroll": 0},
  "two layers per loop step": {"model.scan_unroll": 2, "model.llm.depth": 4},
  "chunked loss": {"model.loss_chunk": 5},
  **{f"remat {policy}": {"model.remat": policy} for policy in ("full", "dots", "dots_with_no_batch_dims", "offload")},
  "all": {"model.attention": "blockwise", "model.attention_block": 16, "model.scan_unroll": 0, "model.loss_chunk": 12},
}


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def _config(tok, base: dict, lever: dict):
  cfg = helpers.tiny_config({**base, **PLAIN, **lever})
  build_lib.resolve_model_config(cfg, tok.vocab_size)
  return cfg


def _value_and_grads(cfg, tok, params, batch, stage: str):
  task = tasks.task_of(cfg)
  model = task.make_model(cfg, tok.image_id)
  labels = optim.param_labels(params, cfg.train, stage)
  batch = {k: v for k, v in batch.items() if k in tasks.VLM_INPUTS + ("targets", "loss_mask")}

  def loss(trainable):
    loss_sum, count = task.loss(model.apply, with_frozen(trainable, params), batch)
    return loss_sum, count

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable_part(params, labels))


def _init(cfg, tok, batch):
  model = tasks.task_of(cfg).make_model(cfg, tok.image_id)
  inputs = [batch[k] for k in tasks.VLM_INPUTS]
  params = nn.meta.unbox(model.init(jax.random.key(0), *inputs)["params"])
  # Cross-attention gates open (they start shut), so that the images reach the loss.
  return jax.tree_util.tree_map_with_path(lambda path, x: x + 0.5 if path[-1].key.endswith("_gate") else x, params)


def _assert_same(cfg_plain, cfg_lever, tok, batch, stage, lever_batch=None):
  """lever_batch: the lever's own batch where it changes what the data sends (else `batch`)."""
  params = _init(cfg_plain, tok, batch)
  (loss_a, count_a), grads_a = _value_and_grads(cfg_plain, tok, params, batch, stage)
  (loss_b, count_b), grads_b = _value_and_grads(
    cfg_lever, tok, params, batch if lever_batch is None else lever_batch, stage
  )
  assert float(count_a) == float(count_b) > 0
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  flat_a, flat_b = build_lib.flat_params(grads_a), build_lib.flat_params(grads_b)
  assert flat_a.keys() == flat_b.keys()
  scale = max(float(np.abs(g).max()) for g in flat_a.values())
  for path in flat_a:
    np.testing.assert_allclose(flat_b[path], flat_a[path], rtol=1e-4, atol=1e-5 * scale, err_msg=path)
  return flat_a


@pytest.mark.parametrize("lever", LEVERS)
@pytest.mark.parametrize("stage", ["full", "stage1"])
def test_lever_gives_the_plain_loss_and_grads_on_packed_rows(tok, lever, stage):
  overrides = {k: v for k, v in LEVERS[lever].items() if k == "model.llm.depth"}
  plain = _config(tok, overrides, {})
  batch = helpers.random_batch(0, plain, tok.image_id)
  assert (batch["segment_ids"] == 2).any() and (batch["segment_ids"] == 0).any()  # packed rows, padding
  grads = _assert_same(plain, _config(tok, overrides, LEVERS[lever]), tok, batch, stage)
  frozen_head = stage == "stage1"
  assert ("llm/lm_head" not in grads) == frozen_head  # frozen params are not differentiated
  assert np.abs(grads["bridge/linear_1/kernel"]).max() > 0


ANYRES = {
  "model.vision.image_size": 32,
  "model.vision.patch_size": 16,
  "model.anyres.enabled": True,
  "model.anyres.grid_pinpoints": "(1x1),...,(1x6)",
  "data.sources": "shapes:wide",
  "data.seq_len": 96,
  "data.pack": True,
  "data.max_images": 3,
  "train.batch_size": 2,
  "model.anyres.max_tiles": 28,
  "data.threads": 0,
  "data.prefetch": 0,
}
PACKED = {
  "data.seq_len": 160,
  "data.pack": True,
  "data.max_images": 3,
  "train.batch_size": 2,
  "data.threads": 0,
  "data.prefetch": 0,
}


@pytest.mark.parametrize("lever", ["blockwise attention", "chunked loss", "all"])
def test_lever_gives_the_plain_loss_and_grads_with_anyres(tok, lever):
  base = ANYRES
  plain = _config(tok, base, {})
  batch = next(Batches(plain, tok, helpers.image_tokens(plain.model), tile_groups=1))
  assert max(len(row) for row in batch["keys"]) >= 2  # packed
  _assert_same(plain, _config(tok, base, LEVERS[lever]), tok, batch, "full")


@pytest.mark.parametrize("base", ["packed", "anyres"])
def test_uint8_images_give_the_float_path_loss_and_grads(tok, base):
  # Not CLIP's mean and std, so a model that ignored them (or the host's) would differ.
  base = {
    **(ANYRES if base == "anyres" else PACKED),
    "data.image_mean": (0.2, 0.5, 0.7),
    "data.image_std": (0.3, 0.25, 0.6),
  }
  host = _config(tok, base, {"data.images_uint8": False})
  device = _config(tok, base, {"data.images_uint8": True})
  batch_host, batch_device = (
    next(Batches(c, tok, helpers.image_tokens(c.model), tile_groups=1)) for c in (host, device)
  )
  assert max(len(row) for row in batch_host["keys"]) >= 2  # packed
  images_host, images_device = (
    b["images"]["tiles"] if "tiles" in b["images"] else b["images"] for b in (batch_host, batch_device)
  )
  assert images_host.dtype == np.float32 and images_device.dtype == np.uint8
  assert images_device.nbytes * 4 == images_host.nbytes
  _assert_same(host, device, tok, batch_host, "full", lever_batch=batch_device)


CROSS_ATTENTION = {"model.fusion": "cross_attention", "model.bridge.kind": "perceiver", "model.bridge.num_latents": 4}


@pytest.mark.parametrize(
  "stage,fusion", [("full", {}), ("stage2", {}), ("stage1", CROSS_ATTENTION)], ids=["full", "stage2", "cross_attention"]
)
def test_image_pool_gives_every_slot_loss_and_grads(tok, tmp_path, stage, fusion):
  # Text-only samples and packed rows with fewer images than slots: the empty slots the pool skips.
  # Cross-attention: each image one <image> marker, read by the blocks of the tokens after it.
  path = llava_fixture.write(str(tmp_path), 24, image_size=32, text_only_every=3, broken=False)
  base = {
    **PACKED,
    "data.sources": f"llava:{path}",
    "data.max_images": 4,
    "data.seq_len": 192,
    "train.batch_size": 4,
    "model.vision.image_size": 32,
    **fusion,
  }
  slots, pool = _config(tok, base, {}), _config(tok, base, {"data.image_pool": 12})
  tile_groups = 2  # as two batch shards would ask
  batch_slots, batch_pool = (
    next(Batches(c, tok, helpers.image_tokens(c.model), tile_groups=tile_groups)) for c in (slots, pool)
  )
  assert batch_slots["keys"] == batch_pool["keys"]  # the pool has room for this batch's images
  empty = batch_slots["image_mask"] == 0
  assert empty.any() and (~empty).any() and max(len(row) for row in batch_slots["keys"]) >= 2
  assert batch_pool["images"]["pool"].shape[:2] == (tile_groups, 6)
  assert batch_pool["images"]["pool"].shape[1] * tile_groups < batch_slots["images"].shape[0] * 4
  grads = _assert_same(slots, pool, tok, batch_slots, stage, lever_batch=batch_pool)
  assert np.abs(grads["bridge/block_0/q/kernel" if fusion else "bridge/linear_1/kernel"]).max() > 0


def test_image_pool_defers_a_sample_its_group_cannot_hold(tok, tmp_path):
  # One image slot per group: each group takes one sample, the next sample opens the next batch.
  path = llava_fixture.write(str(tmp_path), 16, image_size=32, text_only_every=0, broken=False)
  cfg = _config(
    tok,
    {
      **PACKED,
      "data.sources": f"llava:{path}",
      "data.max_images": 4,
      "data.seq_len": 192,
      "train.batch_size": 4,
      "model.vision.image_size": 32,
      "data.image_pool": 2,
    },
    {},
  )
  data = Batches(cfg, tok, helpers.image_tokens(cfg.model), tile_groups=2)
  seen = []
  for _ in range(4):
    rows = next(data)["keys"]
    assert [len(rows[0]) + len(rows[1]), len(rows[2]) + len(rows[3])] == [1, 1]
    seen += [k for row in rows for k in row]
  assert len(set(seen)) == 8 and not data.skipped  # deferred, not dropped or skipped


def test_model_normalises_uint8_as_the_host_does(tok):
  cfg = _config(tok, {"data.image_mean": (0.1, 0.4, 0.9), "data.image_std": (0.2, 0.7, 0.3)}, {})
  model = tasks.task_of(cfg).make_model(cfg, tok.image_id)
  rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  on_host = images_lib.Preprocessing.from_config(cfg).normalize(rgb)
  assert on_host.dtype == np.uint8  # the default sends pixels
  on_host = dataclasses.replace(images_lib.Preprocessing.from_config(cfg), on_device=False).normalize(rgb)
  on_device = model.apply({}, jnp.asarray(rgb), method="pixels")
  np.testing.assert_allclose(on_device, on_host, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(model.apply({}, jnp.asarray(on_host), method="pixels"), on_host)  # floats pass


@pytest.mark.parametrize("attention", ["blockwise", "splash"])
def test_levers_on_a_data_fsdp_tensor_mesh_equal_one_device(tok, attention):
  # Several attention blocks and loss chunks, rows split over data x fsdp, heads and vocab over
  # tensor; splash runs in shard_map over rows and heads.
  cfg = _config(
    tok,
    {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    {**LEVERS["all"], "model.attention": attention, "model.attention_block": 8, "model.loss_chunk": 8},
  )
  batch = {
    k: v
    for k, v in helpers.random_batch(1, cfg, tok.image_id).items()
    if k in tasks.VLM_INPUTS + ("targets", "loss_mask")
  }
  params = _init(cfg, tok, batch)
  (loss_one, _), grads_one = _value_and_grads(cfg, tok, params, batch, "full")
  mesh = parallel.make_mesh(cfg.mesh)
  run = build_lib.build(cfg, mesh, tok.image_id)
  sharded_batch = parallel.global_batch(batch, mesh)
  assert sharded_batch["tokens"].sharding.spec[0] is not None  # rows really are split
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    (loss, _), grads = _value_and_grads(cfg, tok, jax.device_put(params, run.param_shardings), sharded_batch, "full")
  np.testing.assert_allclose(loss, loss_one, rtol=1e-5)
  flat, flat_one = build_lib.flat_params(grads), build_lib.flat_params(grads_one)
  scale = max(float(np.abs(g).max()) for g in flat_one.values())
  for path in flat_one:
    np.testing.assert_allclose(flat[path], flat_one[path], rtol=1e-4, atol=1e-5 * scale, err_msg=path)


# --- the chunked loss itself, at shapes and options the model configs above do not reach ---------
@pytest.mark.parametrize("chunk", [1, 6, 40])
def test_chunked_loss_equals_full_logits(chunk):
  ks = jax.random.split(jax.random.key(3), 4)
  hidden, head = jax.random.normal(ks[0], (3, 37, 16)), jax.random.normal(ks[1], (16, 50))
  targets = jax.random.randint(ks[2], (3, 37), 0, 50)
  mask = (jax.random.uniform(ks[3], (3, 37)) < 0.4).at[2].set(False)  # a row with nothing supervised
  full = lambda h, w: token_loss(jnp.einsum("btd,dv->btv", h, w), targets, mask)
  chunked = lambda h, w: chunked_token_loss(h, w, targets, mask, chunk)
  (loss_ref, count_ref), (loss, count) = full(hidden, head), jax.jit(chunked)(hidden, head)
  assert float(count) == float(count_ref) == float(mask.sum())
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  grad = lambda f: jax.jit(jax.grad(lambda h, w: f(h, w)[0], argnums=(0, 1)))(hidden, head)
  for g, g_ref in zip(grad(chunked), grad(full)):
    np.testing.assert_allclose(g, g_ref, atol=2e-6)
  # a frozen head: no gradient for it, the same one for the hidden states
  d_hidden, d_head = jax.grad(lambda h, w: chunked(h, jax.lax.stop_gradient(w))[0], argnums=(0, 1))(hidden, head)
  assert float(jnp.abs(d_head).max()) == 0
  np.testing.assert_allclose(d_hidden, grad(full)[0], atol=2e-6)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_bf16_frozen_params_give_the_step_of_their_rounded_values(tok, stage):
  from vlm_jax.train import trainer as trainer_lib

  plain, lever = (_config(tok, {"stage": stage}, {"train.frozen_dtype": dtype}) for dtype in ("float32", "bfloat16"))
  mesh = parallel.make_mesh(plain.mesh, jax.devices()[:1])
  trainers = [trainer_lib.build(c, mesh, tok.image_id) for c in (plain, lever)]
  labels = build_lib.flat_params(trainers[0].labels)
  frozen = [path for path, label in labels.items() if label == optim.FROZEN]
  assert frozen and len(frozen) < len(labels)
  # The fp32 run starts from the bf16-rounded values of the frozen params: the same numbers.
  params = jax.tree.map(
    lambda p, label: p.astype(jnp.bfloat16).astype(p.dtype) if label == optim.FROZEN else p,
    trainers[0].run.init_params(jax.random.key(0)),
    trainers[0].labels,
  )
  batch = helpers.random_batch(0, plain, tok.image_id)
  states, losses = [], []
  for trainer in trainers:
    state = trainer.start(jax.tree.map(jnp.copy, params))
    state, metrics = trainer.train_step(state, batch)
    states.append(build_lib.flat_params(helpers.to_host(state["params"])))
    losses.append(float(metrics["train/loss"]))
  assert losses[1] == pytest.approx(losses[0], rel=1e-6)
  for path in labels:
    if path in frozen:  # stored in bf16, untouched
      assert states[1][path].dtype == jnp.bfloat16
      np.testing.assert_array_equal(states[1][path].astype(np.float32), states[0][path], err_msg=path)
    else:
      assert states[1][path].dtype == np.float32
      np.testing.assert_allclose(states[1][path], states[0][path], rtol=1e-5, atol=1e-7, err_msg=path)
