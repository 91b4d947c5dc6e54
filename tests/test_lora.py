"""LoRA and QLoRA (config.lora): an untrained adapter is exactly the base model; training moves
only the adapters (and what the stage trains beside them); adapters shard like their kernels;
QLoRA stores the base quantized; merged == unmerged; the PEFT export loads in transformers."""

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import helpers
import processes
import vlm_jax
from vlm_jax import api, cli, parallel
from vlm_jax import build as build_lib
from vlm_jax.build import flat_params
from vlm_jax.convert import hf_export, peft_export
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.models import lora
from vlm_jax.train import optim, trainer as trainer_lib

LLM_TARGETS = "llm/layers/(q|k|v|o|gate|up|down)"
LORA = {
  "lora.rank": 4,
  "lora.alpha": 8.0,
  "lora.block_size": 8,
  "lora.targets": f"{LLM_TARGETS},vision/layers/(q|v|fc1)",
}


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def lora_config(tok, overrides: dict | None = None):
  cfg = helpers.tiny_config({**LORA, **(overrides or {})})
  build_lib.resolve_model_config(cfg, tok.vocab_size)
  return cfg


def mesh_of(cfg, devices: int):
  return parallel.make_mesh(cfg.mesh, jax.devices()[:devices])


def batch_for(cfg, tok, mesh, seed: int = 0) -> dict:
  batch = {k: v for k, v in helpers.random_batch(seed, cfg, tok.image_id).items() if k != "image_mask"}
  return parallel.global_batch(batch, mesh)


def logits(run: build_lib.Run, params, batch: dict) -> np.ndarray:
  inputs = (batch["tokens"], batch["images"], batch["positions"], batch["segment_ids"])
  apply = build_lib.in_mesh(jax.jit(lambda p: run.model.apply({"params": p}, *inputs)), run.mesh)
  return np.asarray(apply(params))


def with_random_adapters(params: dict, seed: int) -> dict:
  """Adapters with nonzero b (as after training), so that they change the model."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: (
      jax.device_put(rng.normal(0, 0.2, x.shape).astype(np.float32), x.sharding)
      if lora.is_adapter(build_lib.path_str(path))
      else x
    ),
    params,
  )


# --- an untrained adapter, and shardings ------------------------------------------------------
@pytest.mark.parametrize("base_dtype", ["float32", "int8", "nf4"])
def test_zero_b_gives_the_base_model_exactly(tok, base_dtype):
  """b = 0 at init: the adapted model's logits are the base model's, bit for bit (QLoRA: those
  of the base model with its kernels dequantized, to fp32 rounding)."""
  cfg = lora_config(tok, {"lora.base_dtype": base_dtype, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  run = build_lib.build(cfg, mesh_of(cfg, 8), tok.image_id)
  base = run.base.init_params(jax.random.key(1))
  params = run.adapt(jax.tree.map(jnp.copy, base))
  batch = batch_for(cfg, tok, run.mesh)
  if base_dtype == "float32":
    np.testing.assert_array_equal(logits(run, params, batch), logits(run.base, base, batch))
  expected = lora.merge(params, cfg.lora, with_adapters=False)  # the kernels as stored (dequantized)
  np.testing.assert_allclose(logits(run, params, batch), logits(run.base, expected, batch), rtol=1e-5, atol=1e-5)
  # ... and an adapter that is not zero changes them.
  assert not np.allclose(logits(run, with_random_adapters(params, 0), batch), logits(run.base, expected, batch))


def test_adapters_shard_like_their_kernels(tok):
  """a takes the kernel's (first) input axis, b its first output axis; the layer axis stays."""
  cfg = lora_config(tok, {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  run = build_lib.build(cfg, mesh_of(cfg, 8), tok.image_id)
  specs = {k: tuple(s.spec) + (None,) * 4 for k, s in flat_params(run.param_shardings).items()}
  modules = {p.rsplit("/", 1)[0] for p in specs if lora.is_adapter(p)}
  assert {"llm/layers/q", "llm/layers/o", "llm/layers/down", "vision/layers/fc1"} <= modules
  for m in modules:
    kernel, a, b = specs[f"{m}/kernel"], specs[f"{m}/kernel_lora_a"], specs[f"{m}/kernel_lora_b"]
    n_in = 2 if m.endswith("/o") else 1
    assert a[:3] == (kernel[0], kernel[1], None), m
    assert b[:3] == (kernel[0], None, kernel[1 + n_in]), m
  assert specs["llm/layers/q/kernel_lora_a"][1] == "fsdp" and specs["llm/layers/q/kernel_lora_b"][2] == "tensor"


# --- training -----------------------------------------------------------------------------------
def train_steps(cfg, tok, devices: int, steps: int = 3):
  trainer = trainer_lib.build(cfg, mesh_of(cfg, devices), tok.image_id)
  state = trainer.start(trainer.run.base.init_params(jax.random.key(2)))
  start = helpers.to_host(state["params"])
  losses = []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, batch_for(cfg, tok, trainer.run.mesh))
    losses.append(float(metrics["train/loss"]))
  return trainer, start, state, losses


@pytest.mark.parametrize("base_dtype", ["float32", "nf4"])
def test_only_adapters_and_the_bridge_train(tok, base_dtype):
  """stage2 with adapters on the LLM: the LLM trains only its adapters, the bridge trains fully,
  the (stage-frozen) vision adapters stay; frozen params are bit-identical and have no optimizer
  state. The (2,2,2) mesh gives the one-device run's losses and params."""
  cfg = lora_config(
    tok,
    {
      "stage": "stage2",
      "lora.base_dtype": base_dtype,
      "lora.dropout": 0.1,
      "mesh.data": 2,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
    },
  )
  trainer, start, state, losses = train_steps(cfg, tok, 8)
  before, after = flat_params(start), flat_params(helpers.to_host(state["params"]))
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  llm_adapters = {p for p in before if p.startswith("llm/") and lora.is_adapter(p)}
  bridge = {p for p in before if p.startswith("bridge/")}
  assert changed == llm_adapters | bridge
  labels = flat_params(trainer.labels)
  assert {p for p, l in labels.items() if l != optim.FROZEN} == changed
  assert sorted(set(helpers.moment_paths(state["opt_state"]))) == sorted(changed)
  if base_dtype == "nf4":
    assert before["llm/layers/q/kernel/.array/.qvalue"].dtype == jnp.uint4
  assert losses[-1] < losses[0]

  cfg1 = lora_config(tok, {"stage": "stage2", "lora.base_dtype": base_dtype, "lora.dropout": 0.1})
  _, _, state1, losses1 = train_steps(cfg1, tok, 1)
  np.testing.assert_allclose(losses, losses1, rtol=1e-5)
  one = flat_params(helpers.to_host(state1["params"]))
  for p in changed:
    np.testing.assert_allclose(after[p], one[p], rtol=1e-4, atol=1e-6, err_msg=p)


# The layers that run in slices of their stack (models/layers.py LayerStack): between the
# cross-attention blocks of fusion, and one at a time under ToMe.
SLICED = {
  "cross_attention": {
    "model.fusion": "cross_attention",
    "model.bridge.kind": "perceiver",
    "model.bridge.num_latents": 4,
    "model.llm.depth": 3,
  },
  "token_merging": {
    "model.vision.token_merging": 2,
    "model.vision.image_size": 32,
    "model.vision.depth": 2,
    "model.bridge.kind": "mlp2x_gelu",
  },
}


@pytest.mark.parametrize("kind", sorted(SLICED))
def test_adapters_reach_and_train_in_sliced_stacks(tok, kind):
  """LoRA on the LLM's and the ViT's layers of a cross-attention-fusion model and of a ToMe model:
  an untrained adapter is the base model exactly, a nonzero one changes it; training (stage full)
  moves the adapters of every layer and nothing else of the adapted layers, the rest trains whole."""
  cfg = lora_config(tok, SLICED[kind])
  run = build_lib.build(cfg, mesh_of(cfg, 1), tok.image_id)
  base = run.base.init_params(jax.random.key(1))
  params = run.adapt(jax.tree.map(jnp.copy, base))
  batch = batch_for(cfg, tok, run.mesh)
  np.testing.assert_array_equal(logits(run, params, batch), logits(run.base, base, batch))
  assert not np.allclose(logits(run, with_random_adapters(params, 0), batch), logits(run.base, base, batch))

  trainer, start, state, losses = train_steps(cfg, tok, 1)
  before, after = flat_params(start), flat_params(helpers.to_host(state["params"]))
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  adapters = {p for p in before if lora.is_adapter(p)}
  assert {p.rsplit("/", 1)[0] for p in adapters} >= {"llm/layers/q", "vision/layers/fc1"}
  whole = {p for p in before if p.split("/", 1)[0] not in ("llm", "vision")}  # bridge (and fusion's blocks)
  assert changed == adapters | whole
  assert sorted(set(helpers.moment_paths(state["opt_state"]))) == sorted(changed)
  assert losses[-1] < losses[0]


def test_dropout_changes_the_step_and_not_eval(tok):
  """lora.dropout acts in the train step only (eval and inference run without it)."""
  losses = {}
  for dropout in (0.0, 0.5):
    cfg = lora_config(tok, {"lora.dropout": dropout, "train.lr": 0.05})
    trainer, _, state, losses[dropout] = train_steps(cfg, tok, 1, steps=2)
  assert losses[0.0][0] == losses[0.5][0]  # b = 0: dropout on the adapter input changes nothing yet
  assert losses[0.0][1] != losses[0.5][1]
  batch = batch_for(cfg, tok, trainer.run.mesh)
  np.testing.assert_array_equal(
    logits(trainer.run, state["params"], batch), logits(trainer.run, state["params"], batch)
  )


# --- QLoRA --------------------------------------------------------------------------------------
def adapted_kernel_params(run: build_lib.Run) -> int:
  return sum(
    x.size
    for p, x in flat_params(run.base.abstract_params).items()
    if p.endswith("/kernel") and f"{p}_lora_a" in flat_params(run.abstract_params)
  )


@functools.cache
def stored_base(base_dtype: str) -> tuple[build_lib.Run, int, np.ndarray]:
  """The LoRA model with its base stored in `base_dtype` (the same init and adapters for every
  dtype): its run, its compiled eval step's argument bytes and its logits. Computed once a dtype
  (float32 and bfloat16 serve every case below)."""
  tok = Tokenizer.load("shapes")
  cfg = lora_config(tok, {"lora.base_dtype": base_dtype})
  trainer = trainer_lib.build(cfg, mesh_of(cfg, 1), tok.image_id)
  state = trainer.start(trainer.run.base.init_params(jax.random.key(3)))
  batch = batch_for(cfg, tok, trainer.run.mesh)
  params = with_random_adapters(state["params"], 1)
  compiled = trainer.run.eval_step.lower(params, batch).compile()
  return trainer.run, compiled.memory_analysis().argument_size_in_bytes, logits(trainer.run, params, batch)


@pytest.mark.parametrize(
  "base_dtype, bytes_per_param, tolerance", [("bfloat16", 2, 0.0), ("int8", 1, 0.02), ("nf4", 0.5, 0.25)]
)
def test_qlora_stores_the_base_quantized_and_stays_close(base_dtype, bytes_per_param, tolerance):
  """The compiled eval step's arguments shrink by exactly the adapted kernels' saving, less their
  fp32 scales; logits stay within `tolerance` (relative L2) of the bf16 base's."""
  sizes, outputs = {}, {}
  for dtype in ("float32", "bfloat16", base_dtype):
    run, sizes[dtype], outputs[dtype] = stored_base(dtype)
  n = adapted_kernel_params(run)
  scales = sum(x.size for p, x in flat_params(run.abstract_params).items() if p.endswith(".scale"))
  assert (scales == 0) == (base_dtype == "bfloat16") and scales <= n // 8  # fp32, one per block of 8 or fewer
  assert sizes["float32"] - sizes[base_dtype] == int(n * (4 - bytes_per_param)) - 4 * scales
  err = np.linalg.norm(outputs[base_dtype] - outputs["bfloat16"]) / np.linalg.norm(outputs["bfloat16"])
  print(f"{base_dtype}: logits relative error {err:.4f} against the bf16 base")
  assert err <= tolerance
  if base_dtype != "bfloat16":
    assert err > 0


def test_qlora_takes_the_largest_block_that_divides_each_kernel(tok, caplog):
  """block_size 16 over kernels whose last input axis is 8 (o reads head_dim 8) or wider: each
  kernel gets the largest power of two up to 16 that divides its input, and the log says which."""
  cfg = lora_config(tok, {"lora.base_dtype": "nf4", "lora.block_size": 16})
  with caplog.at_level(logging.INFO, logger="vlm_jax"):
    run = build_lib.build(cfg, mesh_of(cfg, 1), tok.image_id)
  assert "llm/layers/o 8" in caplog.text and "llm/layers/q 16" not in caplog.text
  kernels, abstract = flat_params(run.base.abstract_params), flat_params(run.abstract_params)
  scale = lambda module: (
    next(x for p, x in abstract.items() if p.startswith(f"llm/layers/{module}/kernel/") and p.endswith(".scale")).shape
  )
  layers, width, heads, head_dim = kernels["llm/layers/q/kernel"].shape
  assert scale("q") == (layers, width // 16, heads, head_dim)  # [layers, in, *out]: blocks of 16 along in
  assert scale("o") == (layers, 1, head_dim // 8, width)  # [layers, heads, head_dim, out]: of 8 along head_dim


# --- export ---------------------------------------------------------------------------------------
def hf_logits(model, batch) -> np.ndarray:
  ids = torch.tensor(np.asarray(batch["tokens"][:2]))
  pixels = torch.tensor(np.asarray(batch["images"][:2, 0]).transpose(0, 3, 1, 2))
  with torch.no_grad():
    return model(input_ids=ids, pixel_values=pixels).logits.numpy()


def test_peft_and_merged_exports_give_our_logits(tok, tmp_path):
  """--peft: transformers' LLaVA + PeftModel gives the logits of our unmerged model;
  --merge-lora: the plain exported model gives the same."""
  cfg = lora_config(tok, {"lora.targets": f"{LLM_TARGETS},vision/layers/(q|k|v|o|fc1|fc2),bridge/linear_1"})
  run = build_lib.build(cfg, mesh_of(cfg, 1), tok.image_id)
  params = with_random_adapters(run.adapt(run.base.init_params(jax.random.key(4))), 2)
  batch = batch_for(cfg, tok, run.mesh)
  assert (np.asarray(batch["tokens"][:2]) == tok.image_id).any(axis=1).all()  # each row has its image
  real = np.asarray(batch["segment_ids"][:2]) == 1  # one segment each, then padding (ours masks it)
  ours = logits(run, params, batch)[:2][real]
  for mode in ("peft", "merge"):
    out = str(tmp_path / mode)
    config, plain, peft_args = hf_export.plain_model(run, params, merge_lora=mode == "merge", peft=mode == "peft")
    hf_export.export(config, tok, plain, None, out, peft=peft_args)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    if mode == "peft":
      adapter = os.path.join(out, peft_export.ADAPTER_DIR)
      with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert len(json.load(f)["target_modules"]) == 2 * 7 + 6 + 1  # LLM layers x 7, the ViT's one x 6, the bridge's
      assert np.abs(hf_logits(model, batch)[real] - ours).max() > 1e-2  # the base alone differs
      model = peft.PeftModel.from_pretrained(model, adapter)
    np.testing.assert_allclose(hf_logits(model, batch)[real], ours, atol=1e-4)


# --- the CLI: a LoRA run, its resume, inference and export ----------------------------------------
LORA_ARGS = [
  "--config.lora.rank=4",
  "--config.lora.alpha=8",
  f"--config.lora.targets={LLM_TARGETS}",
  "--config.lora.base_dtype=nf4",
  "--config.lora.block_size=8",
  "--config.train.lr=5e-3",
]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
  """A: a LoRA run stopped at step 2, then resumed to 4. B: unbroken to 4."""
  root = tmp_path_factory.mktemp("lora")
  a, b = str(root / "a"), str(root / "b")
  cfg = processes.config(LORA_ARGS)
  api.train(cfg, a, stop_after=2)
  api.train(processes.config(LORA_ARGS), a)
  api.train(processes.config(LORA_ARGS), b)
  return dict(a=a, b=b)


def test_resumed_lora_run_matches_the_unbroken_one(lora_runs):
  a, b = processes.metrics(lora_runs["a"]), processes.metrics(lora_runs["b"])
  losses = [b[s]["train/loss"] for s in range(1, 5)]
  assert len(set(losses)) == 4
  assert [a[s]["train/loss"] for s in range(1, 5)] == losses
  assert a[4]["eval/shapes_test/loss"] == b[4]["eval/shapes_test/loss"]


def test_lora_checkpoint_generates_as_its_merged_export(lora_runs, tmp_path, capsys):
  """Inference reads the LoRA checkpoint unmerged; its --merge-lora export answers the same."""
  workdir, out = lora_runs["b"], str(tmp_path / "merged")
  assert cli.main(["convert", "--checkpoint", workdir, "--to-hf", str(tmp_path / "x")]) == 2
  assert "give --merge-lora" in capsys.readouterr().err
  assert cli.main(["convert", "--checkpoint", workdir, "--to-hf", out, "--merge-lora"]) == 0
  image = np.zeros((32, 32, 3), np.uint8)
  image[8:24, 8:24] = (255, 0, 0)
  prompts = ["What color is the square?", "How many shapes are there?"]
  ours = vlm_jax.load(workdir, dtype="float32")
  merged = vlm_jax.load(out, dtype="float32")
  assert lora.enabled(ours.config.lora) and not lora.enabled(merged.config.lora)
  kw = dict(max_new_tokens=6)
  assert ours.generate([image, image], prompts, **kw) == merged.generate([image, image], prompts, **kw)
  tokens = ours.encode_prompt(prompts[0], image=[image])[None]
  assert (tokens == merged.encode_prompt(prompts[0], image=[image])[None]).all()
  inputs = (tokens, ours.pixels([image]), np.arange(tokens.shape[1])[None], np.ones_like(tokens))
  got, want = (np.asarray(m.run.model.apply({"params": m.params}, *inputs)) for m in (ours, merged))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_target_that_matches_nothing_is_one_line_and_exit_2(tmp_path, capsys):
  workdir = tmp_path / "w"
  code = cli.main(
    [
      "train",
      "--config",
      processes.CONFIG,
      "--workdir",
      str(workdir),
      *processes.TINY,
      *LORA_ARGS,
      "--config.lora.targets=llm/layers/q_proj",
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert "config.lora.targets: pattern 'llm/layers/q_proj' matches no Dense module" in err[-1]
  assert not workdir.exists()


# --- learning: LoRA and QLoRA from a briefly trained model --------------------------------------
def shapes_tiny(workdir: str, args: list[str]) -> None:
  """`vlm-jax train` of the default config (configs/shapes_tiny.py) with --config.KEY=VALUE args,
  as a user runs it: hundreds of steps, at XLA's default optimization (processes.vlm_jax_cli)."""
  processes.vlm_jax_cli("train", "--config", processes.CONFIG, "--workdir", workdir, *args)


def eval_losses(workdir: str) -> dict[int, float]:
  return {s: m["eval/shapes_test/loss"] for s, m in processes.metrics(workdir).items() if "eval/shapes_test/loss" in m}


def test_lora_and_qlora_keep_lowering_the_held_out_loss(tmp_path):
  """shapes_tiny trained fully for 150 steps, then tuned on (stage 2: bridge + LLM
  adapters): both lower the held-out loss at every eval, and QLoRA (nf4, its default blocks) ends
  within 10% of LoRA."""
  base = str(tmp_path / "base")
  common = ["--config.train.eval_examples=64", "--config.train.log_every=30"]
  shapes_tiny(
    base, ["--config.train.steps=150", "--config.train.eval_every=150", "--config.train.checkpoint_every=150", *common]
  )
  start = eval_losses(base)[150]
  final = {}
  for kind in ("float32", "nf4"):
    workdir = str(tmp_path / kind)
    shapes_tiny(
      workdir,
      [
        f"--config.model.init_from={base}",
        "--config.stage=stage2",
        "--config.lora.rank=8",
        "--config.lora.alpha=16",
        f"--config.lora.base_dtype={kind}",
        "--config.train.steps=90",
        "--config.train.eval_every=30",
        "--config.train.checkpoint_every=90",
        "--config.train.warmup_steps=10",
        "--config.train.lr=1e-3",
        *common,
      ],
    )
    losses = eval_losses(workdir)
    print(f"{kind}: held-out loss {start:.4f} (base) -> {[round(losses[s], 4) for s in sorted(losses)]}")
    assert sorted(losses) == [30, 60, 90]
    assert losses[30] > losses[60] > losses[90]
    assert losses[90] < start
    final[kind] = losses[90]
  assert abs(final["nf4"] - final["float32"]) <= 0.1 * final["float32"]
