"""A run started from a checkpoint (config.model.init_from) takes what the checkpoint defines: the
LLaVA-1.5 recipe, given a tiny Hugging Face LLaVA written by transformers (local or in a bucket)
and only sizes for CPU, trains with the checkpoint's model, tokenizer, chat template and image
processor: its first loss is transformers' loss on the same sample, and the trained workdir (lr 0)
generates transformers' greedy tokens. A field that contradicts the weights is refused in one
line, before any write; choices set on purpose are kept. LoRA from the checkpoint exports a PEFT
adapter for that very checkpoint."""

import json
import logging
import os

import numpy as np
import peft
import pytest
import torch
import transformers
from etils import epath

import helpers
import hf_models
import processes
import vlm_jax
from processes import cli_here
from vlm_jax import config as config_lib
from vlm_jax.convert import init_from

RECIPE = os.path.join(processes.ROOT, "configs", "llava15_ref.py") + ":stage2"
NEXT_RECIPE = os.path.join(processes.ROOT, "configs", "llava_next_ref.py") + ":stage2"
# Only sizes for CPU (8 devices: 8 rows, one micro-batch); lr 0 keeps the checkpoint's weights.
SIZES = [
  "--config.train.steps=1",
  "--config.train.batch_size=8",
  "--config.train.grad_accum=1",
  "--config.data.seq_len=64",
  "--config.train.log_every=1",
  "--config.train.lr=0",
]
ANSWER = "a red circle on a blue square"
IMAGE_SIZE = (40, 24)  # portrait: the processor's resize and crop show
# Llama + CLIP, shortest edge and a centre crop (llava-1.5-hf's); Qwen2 + SigLIP, squashed;
# LLaVA-NeXT (AnyRes tiles) over Mistral (configs/llava_next_ref.py).
KINDS = ("clip_crop", "siglip", "next")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for kind in KINDS:
    d = str(tmp_path_factory.mktemp(kind))
    model = hf_models.write_llava(d, kind, seed=6)
    out[kind] = {"dir": d, "hf": model, "processor": transformers.AutoProcessor.from_pretrained(d, backend="pil")}
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
  """One LLaVA JSON sample about a non-square image."""
  d = tmp_path_factory.mktemp("data")
  image = hf_models.image(IMAGE_SIZE)
  image.save(d / "a.png")
  sample = {
    "id": "0",
    "image": "a.png",
    "conversations": [{"from": "human", "value": f"<image>\n{hf_models.QUESTION}"}, {"from": "gpt", "value": ANSWER}],
  }
  (d / "train.json").write_text(json.dumps([sample]))
  return {"spec": f"llava:{d / 'train.json'}:{d}", "image": image, "image_path": str(d / "a.png")}


def hf_loss(c: dict, image) -> float:
  """transformers' loss on the sample, labels on the answer only (the prompt's tokens -100)."""
  processor = c["processor"]
  messages = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hf_models.QUESTION}]},
    {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
  ]
  prompt = hf_models.hf_inputs(processor, image)["input_ids"]
  text = processor.apply_chat_template(messages)
  bos = processor.tokenizer.bos_token
  inputs = processor(
    images=[image], text=[text], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))
  )
  assert inputs["input_ids"][0, : prompt.shape[1]].tolist() == prompt[0].tolist()
  labels = inputs["input_ids"].clone()
  labels[:, : prompt.shape[1]] = -100
  assert (labels >= 0).sum() == len(ANSWER.split())
  with torch.no_grad():
    return float(c["hf"](**inputs, labels=labels).loss)


def in_bucket(directory: str, monkeypatch) -> str:
  """A copy of the directory at gs://bucket/NAME (an in-memory stand-in for GCS)."""
  helpers.fake_gcs(monkeypatch)
  root = epath.Path(f"gs://bucket/{os.path.basename(directory)}")
  for name in os.listdir(directory):
    (root / name).write_bytes(open(os.path.join(directory, name), "rb").read())
  return str(root)


@pytest.mark.parametrize(
  "kind, where", [("clip_crop", "local"), ("siglip", "local"), ("clip_crop", "gs"), ("next", "local")]
)
def test_the_recipe_trains_what_the_checkpoint_defines(
  kind, where, checkpoints, data, tmp_path, capsys, caplog, monkeypatch
):
  c = checkpoints[kind]
  source = in_bucket(c["dir"], monkeypatch) if where == "gs" else c["dir"]
  work = str(tmp_path / "run")
  recipe, sizes = (NEXT_RECIPE, [*SIZES, "--config.data.seq_len=160"]) if kind == "next" else (RECIPE, SIZES)
  with caplog.at_level(logging.INFO, logger="vlm_jax"):
    out = cli_here(
      capsys,
      "train",
      "--config",
      recipe,
      "--workdir",
      work,
      f"--config.model.init_from={source}",
      "--data",
      data["spec"],
      "--eval-data",
      data["spec"],
      *sizes,
    )
  assert out.returncode == 0, out.stderr[-3000:]
  # The log lists what came from the checkpoint instead of the recipe.
  assert f"from {source} (config.model.init_from)" in caplog.text
  assert "model.llm.width: 4096 -> 32" in caplog.text and "data.template: 'vicuna_v1' -> 'hf'" in caplog.text
  # Tokenizer, template, processor and weights: the first step's loss is transformers'.
  loss = processes.metrics(work)[1]["train/loss"]
  expected = hf_loss(c, data["image"])
  print(f"{kind} ({where}): first loss {loss:.6f}, transformers {expected:.6f}")
  assert abs(loss - expected) <= 1e-4
  # ... and the trained workdir (lr 0) answers with transformers' greedy tokens.
  out = cli_here(
    capsys,
    "generate",
    "--checkpoint",
    work,
    "--image",
    data["image_path"],
    "--prompt",
    hf_models.QUESTION,
    "--max-new-tokens",
    str(hf_models.NEW_TOKENS),
    "--json",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  expected = hf_models.hf_greedy(c["hf"], hf_models.hf_inputs(c["processor"], data["image"]))
  assert len(expected) == hf_models.NEW_TOKENS and json.loads(out.stdout)["token_ids"] == expected
  # The workdir is a checkpoint like the HF directory: the recipe started from it takes its model.
  config = config_lib.load_file(recipe)
  config.model.init_from = work
  init_from.take_from_checkpoint(config)
  saved = config_lib.from_json(open(os.path.join(work, "config.json")).read())
  assert config.model.to_dict() == dict(saved.model.to_dict(), init_from=work)
  assert config.data.tokenizer == source and config.data.image_resize == saved.data.image_resize


@pytest.mark.parametrize(
  "override, field",
  [
    ("--config.model.llm.norm_eps=1e-3", "model.llm.norm_eps"),
    ("--config.model.llm.rope_theta=1e4", "model.llm.rope_theta"),
    ("--config.data.tokenizer=shapes", "data.tokenizer"),
    ("--config.model.vision.depth=1", "model.vision.depth"),
  ],
)
def test_a_field_the_weights_define_is_refused_in_one_line(override, field, checkpoints, data, tmp_path, capsys):
  work = tmp_path / "run"
  out = cli_here(
    capsys,
    "train",
    "--config",
    RECIPE,
    "--workdir",
    str(work),
    f"--config.model.init_from={checkpoints['clip_crop']['dir']}",
    "--data",
    data["spec"],
    *SIZES,
    override,
  )
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert lines[-1].startswith(f"vlm-jax: error: --config.{field}=") and "defines it as" in lines[-1], lines[-1]
  assert not work.exists()


def test_rows_longer_than_the_context_are_refused_at_start(checkpoints, data, tmp_path, capsys):
  work = tmp_path / "run"
  out = cli_here(
    capsys,
    "train",
    "--config",
    RECIPE,
    "--workdir",
    str(work),
    f"--config.model.init_from={checkpoints['siglip']['dir']}",
    "--data",
    data["spec"],
    *SIZES,
    "--config.data.seq_len=40000",
  )
  assert out.returncode == 2
  assert (
    out.stderr.strip()
    .splitlines()[-1]
    .startswith(
      "vlm-jax: error: config.data.seq_len (40000) is longer than the model's context (config.model.llm.max_len = 32768)"
    )
  )
  assert not work.exists()


def test_choices_set_on_purpose_are_kept(checkpoints):
  """The template, image processing, compute dtype and a longer context are the run's to choose."""
  config = config_lib.load_file(RECIPE)
  config.model.init_from = checkpoints["clip_crop"]["dir"]
  config.data.template = "vicuna_v1"
  config.data.image_resize = "pad_square"
  config.model.llm.max_len = 8192
  taken = init_from.take_from_checkpoint(config, ["data.template", "data.image_resize", "model.llm.max_len"])
  assert (config.data.template, config.data.image_resize, config.model.llm.max_len) == ("vicuna_v1", "pad_square", 8192)
  assert "model.dtype: 'bfloat16' -> 'float32'" in taken  # the tiny checkpoint is stored in fp32
  stage1 = config_lib.load_file(RECIPE.replace("stage2", "stage1"))
  stage1.model.init_from = checkpoints["clip_crop"]["dir"]
  init_from.take_from_checkpoint(stage1)
  assert stage1.data.template == "plain"  # captions are a training format, not a chat template to replace


def test_peft_adapter_applies_to_the_checkpoint_the_run_started_from(checkpoints, data, tmp_path, capsys):
  """LoRA on the LLM, the bridge trained whole (stage 2): `--peft` writes an adapter that PEFT
  loads on the original Hugging Face model (not an exported base), the bridge as modules_to_save."""
  c = checkpoints["clip_crop"]
  work, out = str(tmp_path / "run"), str(tmp_path / "adapter")
  trained = cli_here(
    capsys,
    "train",
    "--config",
    RECIPE,
    "--workdir",
    work,
    f"--config.model.init_from={c['dir']}",
    "--data",
    data["spec"],
    *SIZES,
    "--config.train.steps=2",
    "--config.train.lr=1e-2",
    "--config.train.warmup_steps=0",
    "--config.lora.rank=4",
    "--config.lora.alpha=8",
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert cli_here(capsys, "convert", "--checkpoint", work, "--to-hf", out, "--peft").returncode == 0
  with open(os.path.join(out, "adapter_config.json")) as f:
    adapter = json.load(f)
  assert adapter["base_model_name_or_path"] == c["dir"]
  assert adapter["modules_to_save"] == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
  assert not [f for f in os.listdir(out) if f.startswith("model")]  # an adapter, not a model
  ours = vlm_jax.load(work, dtype="float32")
  inputs = hf_models.hf_inputs(c["processor"], data["image"])
  ids = inputs["input_ids"].numpy().astype(np.int32)
  positions = np.arange(ids.shape[1])[None]
  mine = np.asarray(
    ours.run.model.apply({"params": ours.params}, ids, ours.pixels([data["image"]]), positions, np.ones_like(positions))
  )[0]
  base = transformers.LlavaForConditionalGeneration.from_pretrained(c["dir"], attn_implementation="eager")
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(base, out)(**inputs).logits[0].numpy()
    original = c["hf"](**inputs).logits[0].numpy()
  np.testing.assert_allclose(mine, theirs, atol=1e-4)
  assert np.abs(mine - original).max() > 1e-2  # training moved the model: the adapter carries it


def test_a_missing_checkpoint_is_one_line_naming_the_field(data, tmp_path, capsys):
  work = tmp_path / "run"
  out = cli_here(
    capsys,
    "train",
    "--config",
    RECIPE,
    "--workdir",
    str(work),
    f"--config.model.init_from={tmp_path / 'nope'}",
    "--data",
    data["spec"],
    *SIZES,
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
    f"vlm-jax: error: config.model.init_from: no such file or directory: {tmp_path / 'nope'}"
  )
  assert not work.exists()
