"""AOT compilation for TPU topologies from this CPU machine (libtpu, the test extra's jax[tpu]):
the train step's per-chip memory, sharding and kernels are the TPU compiler's."""

import json
import os

import jax
import ml_collections
import pytest

import helpers
import processes
from processes import cli_here
from vlm_jax import aot
from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.train import trainer as trainer_lib

ROOT = processes.ROOT
# A model whose LLM dominates its params, so replicated LLM weights would show in the arguments.
SMALL = {
  "model.dtype": "bfloat16",
  "model.attention": "splash",
  "model.llm.width": 256,
  "model.llm.mlp_dim": 1024,
  "model.llm.depth": 4,
  "model.llm.heads": 4,
  "model.llm.kv_heads": 2,
  "model.llm.head_dim": 64,
  "data.seq_len": 256,
  "mesh.data": 1,
  "mesh.fsdp": 4,
}


def _state_bytes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(params + optimizer state bytes, params bytes) of the whole model, unsharded."""
  one = config_lib.from_json(config_lib.to_json(config))
  one.mesh.update(dict(data=1, fsdp=1, tensor=1))
  state = trainer_lib.build(one, parallel.make_mesh(one.mesh, jax.devices()[:1]), 0).abstract_state
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return size(state), size(state["params"])


def test_splash_train_step_compiles_for_v5e_sharded_over_fsdp():
  config = helpers.tiny_config(SMALL)
  build_lib.resolve_model_config(config, Tokenizer.load("shapes").vocab_size)
  report = aot.compile_run(config, "v5e:2x2")
  assert (report.chips, report.device_kind, report.mesh) == (4, "TPU v5 lite", {"data": 1, "fsdp": 4, "tensor": 1})
  assert report.fits and 0 < report.total_bytes < report.hbm_bytes and report.generation is None
  assert report.pallas_kernels > 0  # splash, not a fallback
  # fsdp: each chip holds about a quarter of the params and optimizer state (more than a quarter:
  # the TPU pads small arrays to its 8 x 128 tiles), not all of it, and gathers the weights when a
  # layer needs them.
  state, params = _state_bytes(config)
  assert params / 4 < report.memory.arguments_bytes < state / 2
  assert report.collectives["all-gather"] > 0


def test_model_flops_equal_the_compilers_count_of_an_unrolled_step():
  # The compiler counts a loop body once; unrolled (and full logits, no loss loop) its count is
  # the whole step's, which model_flops must reproduce but for what it leaves out: elementwise
  # work (norms, softmaxes, AdamW) and the masked half of the causal scores, which the XLA path
  # computes (a flash kernel skips it). Short rows keep that to a few percent.
  config = helpers.tiny_config(
    {
      **SMALL,
      "model.attention": "xla",
      "model.scan_unroll": 0,
      "model.loss_chunk": 0,
      "stage": "stage2",
      "data.seq_len": 64,
    }
  )
  build_lib.resolve_model_config(config, Tokenizer.load("shapes").vocab_size)
  report = aot.compile_run(config, "v5e:2x2")
  assert 0.93 * report.compiler_flops < report.flops_per_step <= report.compiler_flops


SHAPES = processes.CONFIG


def _compile_process(*args: str):
  """`vlm-jax compile ARGS` from a shell, with no platform forced: stdout holds exactly what --json prints."""
  return processes.cli_process("compile", *args, platforms="", timeout=900)


def test_cli_prints_one_json_object_as_the_contract_says():
  out = _compile_process(
    "--config",
    "configs/shapes_tiny.py",
    "--topology",
    "v6e:2x2",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=4",
    "--json",
  )
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["topology"] == "v6e:2x2" and report["chips"] == 4 and report["fits"] is True
  assert set(report["per_chip"]) >= {"arguments_bytes", "temp_bytes", "output_bytes", "total_bytes", "hbm_bytes"}
  assert report["per_chip"]["hbm_bytes"] == int(31.25 * (1 << 30))  # what libtpu's compiler lets a v6e program use
  assert report["flops_per_step"] > 0 and report["collectives"]["all-gather"] > 0
  # Generation (8 prompts by default) holds the KV cache: rows x kv heads x slots x head dim, K and
  # V, bf16, for every layer, split over the 4 chips.
  generation, shapes = report["generation"], config_lib.load_file(SHAPES)
  llm, prompt = shapes.model.llm, shapes.data.seq_len
  assert (generation["rows"], generation["prompt_tokens"], generation["new_tokens"]) == (8, prompt, 256)
  cache = 8 * llm.kv_heads * (prompt + 256) * llm.head_dim * 2 * 2 * llm.depth
  assert generation["decode"]["arguments_bytes"] > cache / 4
  assert generation["total_bytes"] >= max(generation["prefill"]["total_bytes"], generation["decode"]["total_bytes"])


def test_a_gpu_estimate_comes_from_the_cpu_compiler(capsys):
  # stage 1's `plain` template (captions), which the shapes questions do not fit: batch shapes do not care
  out = cli_here(
    capsys,
    "compile",
    "--config",
    SHAPES,
    "--topology",
    "gpu:80",
    "--decode-rows",
    "0",
    "--json",
    "--config.stage=stage1",
    "--config.data.template=plain",
  )
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["chips"] == 1 and "estimate" in report["device_kind"] and report["per_chip"]["hbm_bytes"] == 80 * 10**9
  assert report["fits"] and report["per_chip"]["total_bytes"] > 0 and report["pallas_kernels"] == 0


def test_a_step_that_does_not_fit_exits_2_naming_the_levers(capsys):
  # A 2B-parameter LLM replicated on each 16 GiB chip (data parallel, no remat): it cannot fit.
  out = cli_here(
    capsys,
    "compile",
    "--config",
    SHAPES,
    "--topology",
    "v5e:2x2",
    "--config.mesh.data=4",
    "--config.model.llm.width=4096",
    "--config.model.llm.mlp_dim=16384",
    "--config.model.llm.heads=32",
    "--config.model.llm.kv_heads=8",
    "--config.model.llm.head_dim=128",
    "--config.model.llm.depth=8",
  )
  assert out.returncode == 2
  message = out.stderr.strip().splitlines()[-1]
  assert message.startswith("vlm-jax: error: v5e:2x2: does not fit")
  assert "--config.model.remat=full" in message and "--config.mesh.fsdp=4" in message


def test_an_unknown_topology_is_one_line_exit_2(capsys):
  out = cli_here(capsys, "compile", "--config", SHAPES, "--topology", "v5e:3x7x9")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("vlm-jax: error: --topology v5e:3x7x9:")


def test_llava15_stage2_on_v5e_4x4_holds_a_sixteenth_of_params_and_adam():
  # docs/tpu.md "Compiling for a TPU slice": the hand count of LLaVA-1.5 7B's state split over 16 chips.
  # The recipe as shipped: FSDP over every chip, 8 micro-batches, remat.
  out = _compile_process(
    "--config", "configs/llava15_ref.py:stage2", "--topology", "v5e:4x4", "--decode-rows", "0", "--json"
  )
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout)
  m = config_lib.load_file(os.path.join(ROOT, "configs/llava15_ref.py")).model
  llm = 2 * m.llm.vocab_size * m.llm.width + m.llm.depth * (
    4 * m.llm.width * m.llm.heads * m.llm.head_dim + 3 * m.llm.width * m.llm.mlp_dim
  )
  vision = m.vision.depth * (4 * m.vision.width**2 + 2 * m.vision.width * m.vision.mlp_dim)
  bridge = m.vision.width * m.llm.width + m.llm.width**2
  hand = (4 * (llm + vision + bridge) + 8 * (llm + bridge)) / 16  # fp32 params; Adam's two fp32 moments
  assert report["per_chip"]["arguments_bytes"] == pytest.approx(hand, rel=0.02)
  assert report["fits"] and report["collectives"]["all-gather"] > 0 and report["pallas_kernels"] > 0
