"""Bad input at the CLI: one clear line on stderr, exit status 2, no traceback. The cases run
`cli.main` in this process; one runs `python -m vlm_jax.cli` to show the same from a shell."""

import collections
import json
import subprocess

import numpy as np
import PIL.Image
import pytest

import processes
from processes import cli_here
from vlm_jax.data import llava_fixture

CONFIG = processes.CONFIG
ONE_DEVICE = processes.xla_flags(1)  # the processes this file starts


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("vlm-jax: error:")]
  assert len(lines) == 1, result.stderr
  assert "Traceback" not in result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
  "args,needles",
  [
    (("--config.train.lrr=1",), ("train.lrr", "unknown config field")),
    (("--config.train.steps=abc",), ("train.steps",)),
    (("--config.stage=stage9",), ("config.stage",)),
    (("--config.mesh.data=16",), ("config.mesh", "16", "8 are available")),
    (("--config.mesh.data=3", "--config.mesh.fsdp=-1"), ("config.mesh", "do not divide")),
    (("--config.model.bridge.kind=qformerr",), ("config.model.bridge.kind", "qformerr", "mlp2x_gelu")),
    (("--config.train.trainable=bridge/.*,lm/.*",), ("config.train.trainable", "lm/.*", "matches no parameter")),
  ],
)
def test_train_config_errors(tmp_path, capsys, args, needles):
  """A failed start writes nothing: the workdir is not even created."""
  workdir = tmp_path / "w"
  assert_one_line_error(cli_here(capsys, "train", "--config", CONFIG, "--workdir", str(workdir), *args), *needles)
  assert not workdir.exists()


def test_train_missing_workdir_flag(capsys):
  assert_one_line_error(cli_here(capsys, "train", "--config", CONFIG), "--workdir")


def test_train_missing_config_file(tmp_path):
  """From a shell: `python -m vlm_jax.cli` prints the one line, no traceback, and exits 2."""
  result = processes.cli_process(
    "train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path), xla_flags=ONE_DEVICE
  )
  assert_one_line_error(result, "nope.py")
  assert result.stderr.strip().splitlines() == [
    l for l in result.stderr.splitlines() if l.startswith("vlm-jax: error:")
  ]


def test_impossible_mesh_on_8_devices(tmp_path, capsys):
  result = cli_here(
    capsys,
    "train",
    "--config",
    CONFIG,
    "--workdir",
    str(tmp_path / "w"),
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=3",
  )
  assert_one_line_error(result, "2x2x3", "8 are available")


def test_generate_missing_checkpoint(tmp_path, capsys):
  image = tmp_path / "a.png"
  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  assert_one_line_error(
    cli_here(capsys, "generate", "--checkpoint", str(tmp_path / "missing"), "--image", str(image), "--prompt", "hi"),
    "--checkpoint",
    "missing",
  )


def test_generate_missing_image(tmp_path, capsys):
  assert_one_line_error(
    cli_here(capsys, "generate", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "x.png"), "--prompt", "hi"),
    "x.png",
  )


def test_generate_not_a_workdir(tmp_path, capsys):
  image = tmp_path / "a.png"
  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  assert_one_line_error(
    cli_here(capsys, "generate", "--checkpoint", str(tmp_path), "--image", str(image), "--prompt", "hi"),
    "neither a vlm-jax workdir",
  )


def test_unknown_command_and_flag(tmp_path, capsys):
  assert_one_line_error(cli_here(capsys, "trian"), "unknown command")
  assert_one_line_error(cli_here(capsys, "train", "--config", CONFIG, "--workdir", str(tmp_path), "--bogus"), "--bogus")


# --- LLaVA-format data: inspect and train ----------------------------------------------------

LLAVA_CONFIG = """
from vlm_jax.config import base


def get_config(arg=None):
  c = base()
  c.model.dtype = "float32"
  c.model.vision.update(dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64))
  c.model.llm.update(dict(width=32, depth=1, heads=2, kv_heads=1, head_dim=16, mlp_dim=64))
  c.data.sources = "llava:{path}"
  c.data.template = "vicuna_v1"
  c.data.seq_len = 256
  c.data.pack = True
  c.data.max_images = 3
  c.train.steps = 4
  c.train.batch_size = 2
  c.train.log_every = 2
  c.train.eval_every = 1000
  c.train.eval_examples = 2
  c.train.eval_batch_size = 2
  c.train.checkpoint_every = 1000
  c.mesh.data = 1
  return c
"""


@pytest.fixture(scope="module")
def llava_config(tmp_path_factory):
  directory = tmp_path_factory.mktemp("llava")
  path = llava_fixture.write(str(directory), 20, image_size=16)
  config = directory / "llava_tiny.py"
  config.write_text(LLAVA_CONFIG.format(path=path))
  return str(config), path


def test_data_json_counts_one_pass(llava_config, capsys):
  config, _ = llava_config
  result = cli_here(capsys, "data", "--config", config, "--json")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout)
  assert summary["examples"] == 20
  assert summary["skipped"] == dict(collections.Counter(llava_fixture.BROKEN.values()))
  assert 0 < summary["supervised_tokens"] < summary["tokens"]
  text = cli_here(capsys, "data", "--config", config, "--n", "2")
  assert text.returncode == 0 and text.stdout.count("--- ") == 2 and "[[" in text.stdout


def test_train_on_llava_data_skips_and_counts_bad_samples(llava_config, tmp_path):
  """On one device, as its config's mesh says: in a process of its own."""
  config, _ = llava_config
  result = processes.cli_process("train", "--config", config, "--workdir", str(tmp_path / "w"), xla_flags=ONE_DEVICE)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train] == [2, 4] and all(np.isfinite(l["train/loss"]) for l in train)
  assert train[-1]["data/skipped"] > 0
  assert train[-1]["data/skipped"] == sum(v for k, v in train[-1].items() if k.startswith("data/skipped/"))
  assert result.stderr.count("skipping") == len([k for k in train[-1] if k.startswith("data/skipped/")])
  strict = processes.cli_process(
    "train", "--config", config, "--workdir", str(tmp_path / "s"), "--config.data.strict=true", xla_flags=ONE_DEVICE
  )
  assert_one_line_error(strict, "data.strict=True", "sample")


def test_data_bad_spec(capsys):
  assert_one_line_error(cli_here(capsys, "data", "--config", CONFIG, "--data", "coco"), "'coco'", "unknown source")
