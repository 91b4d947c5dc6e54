"""The contrastive task (config.task = "contrastive"): image-caption batches, the model's loss
against the formulas, a sharded step equal to the one-device step, zero-shot eval against a
direct computation, and a VLM taking its ViT from a contrastive run (model.vision.init_from).
(The losses alone: test_losses.py; CLIP / SigLIP checkpoints: test_contrastive_hf.py.)"""

import json

import jax
import numpy as np
import pytest

import helpers
import vlm_jax
from vlm_jax import build as build_lib
from vlm_jax import cli
from vlm_jax import parallel
from vlm_jax.build import flat_params
from vlm_jax.data import pairs, shapes
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.pipeline import Batches, device_batch
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.eval import zeroshot
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import loop
from vlm_jax.train import trainer as trainer_lib

FAMILIES = {
  "siglip": {"model.vision.final_norm": True},
  "clip": {
    "model.vision.flavour": "clip",
    "model.vision.keep_cls": True,
    "model.vision.final_norm": True,
    "model.contrastive.embed_dim": 24,
  },
}


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def config(tok, family: str = "siglip", overrides: dict | None = None):
  cfg = helpers.tiny_config(
    {
      "task": "contrastive",
      "model.contrastive.family": family,
      **FAMILIES[family],
      "model.vision.image_size": 32,
      "model.text.width": 32,
      "model.text.depth": 2,
      "model.text.heads": 2,
      "model.text.mlp_dim": 64,
      "model.text.max_len": 24,
      "data.seq_len": 20,
      "data.threads": 0,
      "data.prefetch": 0,
      "evals.shapes_test.metric": "zeroshot",
      **(overrides or {}),
    }
  )
  build_lib.resolve_model_config(cfg, tok.vocab_size, tok.eos_id)
  return cfg


def batches(cfg, tok, n: int) -> list[dict]:
  data = Batches(cfg, tok, 0, layout="pairs")
  out = [next(data) for _ in range(n)]
  data.close()
  return out


# --- Data: image-caption pairs -----------------------------------------------------------------


def test_pairs_hold_each_samples_image_and_caption_tokens(tok):
  cfg = config(tok, overrides={"data.seq_len": 12})
  first, second = batches(cfg, tok, 2)
  assert first["images"].shape == (8, 32, 32, 3) and first["images"].dtype == np.uint8
  assert first["text"].shape == (8, 12) and first["text"].dtype == np.int32
  preprocess = Preprocessing.from_config(cfg)
  source_index = [int(k[0]) for k in first["keys"]]
  for row, index in enumerate(source_index):
    ex = shapes.make_example(cfg.seed, "train", index, 32)
    np.testing.assert_array_equal(first["images"][row], preprocess(ex.image))
    ids = [tok.bos_id] + tok.encode(shapes.caption(ex.objects))
    expected = (ids[:11] + [tok.eos_id]) if len(ids) >= 12 else ids + [tok.eos_id] + [tok.pad_id] * (11 - len(ids))
    np.testing.assert_array_equal(first["text"][row], expected)
  assert any(np.sum(row != tok.pad_id) == 12 for row in first["text"]), "no caption was cut at seq_len"
  assert set(source_index).isdisjoint(int(k[0]) for k in second["keys"])


def test_pairs_read_llava_captions_skip_bad_samples_and_resume(tok, tmp_path):
  image = tmp_path / "a.png"
  import PIL.Image

  PIL.Image.fromarray(shapes.draw_shapes([], 32)).save(image)
  records = [
    {"id": "cap", "image": "a.png", "caption": "a red circle", "conversations": []},
    {
      "id": "conv",
      "image": "a.png",
      "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "two shapes"}],
    },
    {"id": "noimage", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]},
  ]
  path = tmp_path / "pairs.json"
  path.write_text(json.dumps(records))
  cfg = config(tok, overrides={"data.sources": f"llava:{path}", "train.batch_size": 2})
  data = Batches(cfg, tok, 0, layout="pairs")
  got = [next(data) for _ in range(3)]
  state = data.get_state()
  after = next(data)
  data.close()
  by_key = {k[0]: row for b in got for k, row in zip(b["keys"], b["text"])}
  assert set(by_key) == {"cap", "conv"}
  np.testing.assert_array_equal(by_key["cap"][:5], [tok.bos_id] + tok.encode("a red circle") + [tok.eos_id])
  np.testing.assert_array_equal(by_key["conv"][:4], [tok.bos_id] + tok.encode("two shapes") + [tok.eos_id])
  assert data.skipped.get("image_count", 0) >= 1
  resumed = Batches(cfg, tok, 0, layout="pairs")
  resumed.set_state(state)
  again = next(resumed)
  resumed.close()
  assert again["keys"] == after["keys"]
  np.testing.assert_array_equal(again["text"], after["text"])


# --- The model's loss, and a sharded step ------------------------------------------------------


def reference_loss(family: str, image: np.ndarray, text: np.ndarray, scale: float, bias: float) -> float:
  logits = np.exp(min(scale, np.log(100.0)) if family == "clip" else scale) * image @ text.T
  if family == "clip":

    def ce(x):
      return np.mean(np.log(np.exp(x).sum(1)) - np.diag(x))

    return (ce(logits) + ce(logits.T)) / 2
  labels = 2 * np.eye(len(image)) - 1
  return -np.sum(np.log(1 / (1 + np.exp(-labels * (logits + bias))))) / len(image)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_the_familys_formula_on_the_embeddings(tok, family):
  cfg = config(tok, family)
  run = build_lib.build(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]), tok.image_id)
  params = run.init_params(jax.random.key(0))
  batch = device_batch(batches(cfg, tok, 1)[0])
  image, text = (np.asarray(x, np.float64) for x in run.model.apply({"params": params}, batch["images"], batch["text"]))
  np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, rtol=1e-5)
  loss_sum, count = run.model.apply({"params": params}, batch["images"], batch["text"], method="loss")
  expected = reference_loss(family, image, text, float(params["logit_scale"]), float(params.get("logit_bias", 0.0)))
  assert float(count) == 8
  np.testing.assert_allclose(float(loss_sum) / 8, expected, rtol=1e-5)
  assert ("logit_bias" in params) == (family == "siglip")
  assert ("image_head" in params) == (family == "siglip") and ("image_projection" in params) == (family == "clip")


def train_steps(trainer, state, batch_list):
  losses = []
  for b in batch_list:
    state, metrics = trainer.train_step(state, parallel.global_batch(device_batch(b), trainer.run.mesh))
    losses.append(float(metrics["train/loss"]))
  return helpers.to_host(state), losses


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_step_equals_one_device(tok, family):
  cfg = config(tok, family)
  data = batches(cfg, tok, 2)
  one = trainer_lib.build(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]), tok.image_id)
  init = helpers.to_host(one.init(jax.random.key(cfg.seed)))
  after_one, losses_one = train_steps(one, one.init(jax.random.key(cfg.seed)), data)

  sharded_cfg = config(tok, family, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  sharded = trainer_lib.build(sharded_cfg, parallel.make_mesh(sharded_cfg.mesh), tok.image_id)
  state = sharded.init(jax.random.key(cfg.seed))
  assert any(s is not None for x in flat_params(state["params"]).values() for s in x.sharding.spec)
  after_sharded, losses_sharded = train_steps(sharded, state, data)
  np.testing.assert_allclose(losses_sharded, losses_one, rtol=1e-5)
  assert losses_one[1] < losses_one[0]
  before, one_final, sharded_final = (flat_params(t["params"]) for t in (init, after_one, after_sharded))
  for path, x in before.items():
    assert not np.array_equal(one_final[path], x), f"{path} should train"
    if path.endswith("/k/bias"):  # a key bias cannot move softmax: its gradient is rounding noise
      np.testing.assert_allclose(sharded_final[path], one_final[path], atol=3 * cfg.train.lr, err_msg=path)
    else:
      np.testing.assert_allclose(sharded_final[path], one_final[path], rtol=1e-4, atol=1e-5, err_msg=path)


# --- Zero-shot classification ------------------------------------------------------------------


def test_zeroshot_accuracy_is_the_nearest_prompted_class(tok):
  cfg = config(tok, overrides={"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  run = build_lib.build(cfg, parallel.make_mesh(cfg.mesh), tok.image_id)
  params = run.init_params(jax.random.key(3))
  evaluator = zeroshot.ZeroShot(run, tok, "shapes:test", max_examples=37, batch_size=16)
  metrics = evaluator(params)

  host = helpers.to_host(params)
  apply = jax.jit(lambda p, x, method: run.model.apply({"params": p}, x, method=method), static_argnums=2)
  preprocess = Preprocessing.from_config(cfg)
  examples = [shapes.make_example(cfg.seed, "test", i, 32) for i in range(37)]
  images = np.asarray(apply(host, np.stack([preprocess(e.image) for e in examples]), "image_features"), np.float64)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  for kind, (_, prompts) in shapes.ZEROSHOT.items():
    classes = []
    for class_prompts in prompts:
      tokens = np.stack([pairs.caption_tokens(tok, p, cfg.data.seq_len) for p in class_prompts])
      text = np.asarray(apply(host, tokens, "text_features"), np.float64)
      classes.append((text / np.linalg.norm(text, axis=1, keepdims=True)).mean(0))
    predicted = np.argmax(images @ np.stack(classes).T, axis=1)
    labels = [shapes.zeroshot_label(e, kind) for e in examples]
    scored = [p == label for p, label in zip(predicted, labels) if label is not None]
    assert metrics[f"{kind}/examples"] == len(scored) > 0
    assert metrics[f"{kind}/accuracy"] == pytest.approx(np.mean(scored))
  assert metrics["count/examples"] == 37 > metrics["color/examples"]


# --- A VLM's ViT from a contrastive run ----------------------------------------------------------


def test_vlm_takes_its_vit_from_a_contrastive_run(tok, tmp_path, capsys):
  contrastive_cfg = config(tok, overrides={"model.vision.depth": 2, "train.steps": 1, "mesh.data": -1})
  contrastive_cfg.evals = {}
  loop.train(contrastive_cfg, str(tmp_path / "clip"))
  saved = checkpoint_lib.Checkpointer(tmp_path / "clip" / "checkpoints", read_only=True)
  run = build_lib.build(contrastive_cfg, parallel.make_mesh(contrastive_cfg.mesh), tok.image_id)
  theirs = flat_params(helpers.to_host(saved.restore_params(1, run.abstract_params, run.param_shardings)["vision"]))
  saved.close()

  # The CLI scores a contrastive checkpoint zero-shot; it answers no prompts.
  capsys.readouterr()
  assert (
    cli.main(
      ["eval", "--checkpoint", str(tmp_path / "clip"), "--data", "shapes:test", "--max-examples", "20", "--json"]
    )
    == 0
  )
  scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert scored["count/examples"] == 20 and 0 <= scored["count/accuracy"] <= 1
  with pytest.raises(UserError, match="a contrastive model answers no prompts"):
    vlm_jax.load(str(tmp_path / "clip")).generate([None], ["hi"])

  # One block of two (LLaVA's layer before the last), no final norm: the rest is taken as it is.
  vlm_cfg = helpers.tiny_config(
    {
      "model.vision.image_size": 32,
      "model.vision.init_from": str(tmp_path / "clip"),
      "stage": "stage1",
      "train.steps": 1,
      "mesh.data": -1,
      "data.seq_len": 96,
    }
  )
  vlm_cfg.evals = {}
  build_lib.resolve_model_config(vlm_cfg, tok.vocab_size)
  loop.train(vlm_cfg, str(tmp_path / "vlm"))
  vlm_run = build_lib.build(vlm_cfg, parallel.make_mesh(vlm_cfg.mesh), tok.image_id)
  saved = checkpoint_lib.Checkpointer(tmp_path / "vlm" / "checkpoints", read_only=True)
  ours = flat_params(
    helpers.to_host(saved.restore_params(1, vlm_run.abstract_params, vlm_run.param_shardings)["vision"])
  )
  saved.close()
  assert set(theirs) - set(ours) == {"final_norm/bias", "final_norm/scale"}
  for path, x in ours.items():  # stage 1 freezes the ViT: what it holds after a step is what it took
    np.testing.assert_array_equal(x, theirs[path][:1] if path.startswith("layers/") else theirs[path], err_msg=path)

  wider = helpers.tiny_config(
    {
      "model.vision.image_size": 32,
      "model.vision.width": 48,
      "model.vision.init_from": str(tmp_path / "clip"),
      "train.steps": 1,
      "mesh.data": -1,
    }
  )
  wider.evals = {}
  build_lib.resolve_model_config(wider, tok.vocab_size)
  with pytest.raises(UserError, match=r"config.model.vision.init_from: the ViT of .* does not fit .*width 32 vs 48"):
    loop.train(wider, str(tmp_path / "wider"))
  assert not (tmp_path / "wider").exists()


# --- Config errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "family,overrides,needle",
  [
    ("siglip", {"model.contrastive.family": "align"}, "contrastive.family: 'align' is not one of"),
    ("clip", {"model.vision.flavour": "siglip"}, "vision.flavour: the clip family's tower is 'clip'"),
    ("clip", {"model.vision.keep_cls": False}, "pools the CLS token"),
    ("siglip", {"model.contrastive.embed_dim": 64}, "embed_dim: the siglip family does not project"),
    ("siglip", {"train.grad_accum": 2}, "grad_accum: the contrastive loss needs the whole batch"),
    ("siglip", {"data.seq_len": 40}, "seq_len (40): captions longer than"),
    ("siglip", {"model.text.pool": "mean"}, "text.pool: 'mean' is not one of"),
    ("siglip", {"model.contrastive.loss": "infonce"}, "contrastive.loss: 'infonce' is not one of"),
  ],
)
def test_bad_contrastive_fields_are_one_line_errors(tok, family, overrides, needle):
  with pytest.raises(UserError) as e:
    config(tok, family, overrides)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_contrastive_eval_needs_zeroshot_prompts(tok, tmp_path):
  from vlm_jax.eval import runner

  cfg = config(tok, overrides={"evals.shapes_test.metric": "exact"})
  run = build_lib.build(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]), tok.image_id)
  with pytest.raises(UserError, match="config.evals.shapes_test: metric 'exact': a contrastive model is scored by"):
    runner.periodic_evals(run, tok)
  cfg.evals.shapes_test.update(metric="zeroshot", data="llava:x.json")
  with pytest.raises(UserError, match="needs a set with classes and prompts"):
    runner.periodic_evals(run, tok)
