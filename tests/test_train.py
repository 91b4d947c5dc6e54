"""Trainer equivalences: sharded == single-device step, grad accumulation == one big batch, freezing
is exact and allocates no optimizer state, and a resumed run == an unbroken run."""

import collections
import dataclasses
import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from vlm_jax import api, parallel
from vlm_jax import build as build_lib
from vlm_jax.build import flat_params
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.train import loop, optim
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.optim import FROZEN, component

# Tolerances for fp32 runs that differ only in reduction order (sharding, micro-batching).
LR = 1e-3  # base() train.lr, the size of one Adam step
LOSS_TOL = dict(rtol=1e-6, atol=0)  # seen: <= 2e-7 relative
# Params: Adam divides by sqrt(nu), so a coordinate whose gradient nearly cancels over the batch
# (rounding-level relative to its terms) moves by a rounding-dependent fraction of lr. So: the
# bulk to PARAM_TOL, and at most PARAM_OUTLIERS of all elements (seen: 1 in ~44k) up to
# PARAM_MAX_DIFF per step (seen: 1.6e-5 after 2 steps).
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)
PARAM_OUTLIERS = 1e-3
PARAM_MAX_DIFF = 0.05 * LR
MOMENT_RTOL = 2e-5  # Adam mu/nu, relative to the leaf's largest entry;
# seen: <= 6e-6
# Gradients that are zero in exact arithmetic (a key bias adds the same q.b to every logit of a
# query; softmax ignores it): what is left is rounding noise that depends on the reduction order,
# and Adam turns it into steps of up to ~lr. Only compared up to that size, and not required to train.
NOISE_ONLY = ("vision/layers/k/bias",)
STEPS = 2  # steps compared in the sharding and accumulation tests


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


def make_config(tok, overrides=None) -> ml_collections.ConfigDict:
  cfg = helpers.tiny_config(overrides)
  build_lib.resolve_model_config(cfg, tok.vocab_size)
  return cfg


def single_device_mesh(cfg):
  return parallel.make_mesh(cfg.mesh, jax.devices()[:1])


def train_steps(run, state, batches):
  """-> (state, [host metrics per step])"""
  metrics = []
  for batch in batches:
    state, m = run.train_step(state, parallel.global_batch(batch, run.run.mesh))
    metrics.append(jax.device_get(m))
  return state, metrics


def assert_trees_close(actual, expected, **tol):
  a, e = flat_params(actual), flat_params(expected)
  assert a.keys() == e.keys()
  for path in e:
    np.testing.assert_allclose(a[path], e[path], err_msg=path, **tol)


def assert_params_close(actual, expected, steps):
  a, e = flat_params(actual), flat_params(expected)
  assert a.keys() == e.keys()
  outliers, total = {}, 0
  for path in e:
    x, y = np.asarray(a[path]), np.asarray(e[path])
    assert x.shape == y.shape, path
    diff = np.abs(x - y)
    if path in NOISE_ONLY:
      assert diff.max() <= steps * LR, (path, diff.max())
      continue
    assert diff.max() <= steps * PARAM_MAX_DIFF, (path, diff.max())
    total += y.size
    n = int(np.sum(diff > PARAM_TOL["atol"] + PARAM_TOL["rtol"] * np.abs(y)))
    if n:
      outliers[path] = (n, float(diff.max()))
  assert sum(n for n, _ in outliers.values()) <= PARAM_OUTLIERS * total, outliers


def assert_opt_state_close(actual, expected):
  a, e = jax.tree_util.tree_flatten_with_path(actual), jax.tree_util.tree_flatten_with_path(expected)
  assert a[1] == e[1]  # same tree structure
  for (path, x), (_, y), param in zip(a[0], e[0], helpers.moment_paths(expected, with_none=True)):
    where = jax.tree_util.keystr(path)
    if param is None:  # counts
      assert np.array_equal(x, y), where
    elif param in NOISE_ONLY:
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-9, err_msg=where)
    else:
      np.testing.assert_allclose(x, y, rtol=0, atol=MOMENT_RTOL * np.abs(y).max(), err_msg=where)


@dataclasses.dataclass
class Reference:
  cfg: ml_collections.ConfigDict
  run: trainer_lib.Trainer
  batches: list
  init: dict  # host copy of the initial state
  after: list  # host copies of the state after step 1, 2, ...
  metrics: list


@pytest.fixture(scope="module")
def reference(tok):
  """stage=full on one device, 3 steps: the baseline for sharding, accumulation and freezing."""
  cfg = make_config(tok)
  assert cfg.train.lr == LR
  run = trainer_lib.build(cfg, single_device_mesh(cfg), tok.image_id)
  batches = [helpers.random_batch(seed, cfg, tok.image_id) for seed in range(3)]
  state = run.init(jax.random.key(cfg.seed))
  init = helpers.to_host(state)
  after, metrics = [], []
  for batch in batches:
    state, m = train_steps(run, state, [batch])
    after.append(helpers.to_host(state))
    metrics += m
  return Reference(cfg, run, batches, init, after, metrics)


def compare_to_reference(reference, state, metrics, steps=STEPS):
  for i in range(steps):
    np.testing.assert_allclose(
      metrics[i]["train/loss"], reference.metrics[i]["train/loss"], err_msg=f"loss of step {i + 1}", **LOSS_TOL
    )
    np.testing.assert_allclose(
      metrics[i]["train/grad_norm"],
      reference.metrics[i]["train/grad_norm"],
      err_msg=f"grad norm of step {i + 1}",
      **LOSS_TOL,
    )
    assert metrics[i]["train/supervised_tokens"] == reference.metrics[i]["train/supervised_tokens"]
  host = helpers.to_host(state)
  assert int(host["step"]) == steps
  assert_params_close(host["params"], reference.after[steps - 1]["params"], steps)
  assert_opt_state_close(host["opt_state"], reference.after[steps - 1]["opt_state"])


# --- Sharded == single device ------------------------------------------------------------------


def per_device_fraction(tree) -> float:
  """Elements one device holds / elements in the tree (1.0 = fully replicated)."""
  leaves = [x for x in jax.tree.leaves(tree) if x.ndim]
  held = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in leaves)
  return held / sum(x.size for x in leaves)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(tok, reference, shape):
  data, fsdp, tensor = shape
  cfg = make_config(tok, {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
  mesh = parallel.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
  run = trainer_lib.build(cfg, mesh, tok.image_id)
  if shape == (2, 2, 2):
    # The sharded init itself must reproduce the single-device init.
    state = run.init(jax.random.key(cfg.seed))
    assert_trees_close(helpers.to_host(state["params"]), reference.init["params"], rtol=0, atol=0)
  else:
    state = jax.device_put(reference.init, run.state_shardings)

  params_fraction = per_device_fraction(state["params"])
  moments_fraction = per_device_fraction(state["opt_state"])
  if shape == (8, 1, 1):  # plain data parallelism: every device holds everything
    assert params_fraction == 1.0 and moments_fraction == 1.0
  elif shape == (1, 8, 1):  # ZeRO-3: params and Adam moments split 8 ways (a few tiny leaves aside)
    assert params_fraction < 0.2 and moments_fraction < 0.2, (params_fraction, moments_fraction)
  else:  # fsdp x tensor = 4 ways
    assert params_fraction < 0.35 and moments_fraction < 0.35, (params_fraction, moments_fraction)
    embedding = state["params"]["llm"]["embedder"]["embedding"].sharding
    assert set(jax.tree.leaves(tuple(embedding.spec))) == {"tensor", "fsdp"}

  state, metrics = train_steps(run, state, reference.batches[:STEPS])
  # The step keeps every param in its sharding (no silent re-layout between steps).
  expected = flat_params(run.run.param_shardings)
  for path, x in flat_params(state["params"]).items():
    assert x.sharding.is_equivalent_to(expected[path], x.ndim), path
  compare_to_reference(reference, state, metrics)


# --- Gradient accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_grad_accumulation_matches_one_big_batch(tok, reference, shape):
  half = reference.cfg.train.batch_size // 2
  for batch in reference.batches[:STEPS]:  # else a mean of micro-batch means would pass too
    assert batch["loss_mask"][:half].sum() != batch["loss_mask"][half:].sum()
  data, fsdp, tensor = shape
  cfg = make_config(tok, {"train.grad_accum": 2, "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
  mesh = single_device_mesh(cfg) if shape == (1, 1, 1) else parallel.make_mesh(cfg.mesh)
  run = trainer_lib.build(cfg, mesh, tok.image_id)
  state = jax.device_put(reference.init, run.state_shardings)
  state, metrics = train_steps(run, state, reference.batches[:STEPS])
  compare_to_reference(reference, state, metrics)


# --- Freezing -----------------------------------------------------------------------------------


def trained_components(run) -> dict[str, bool]:
  return {p: l != FROZEN for p, l in flat_params(run.labels).items()}


def check_optimizer_state(run, trains: set[str]):
  """Adam mu and nu exist for every trained param and for no frozen one."""
  sizes = {p: x.size for p, x in flat_params(run.abstract_state["params"]).items()}
  counts = collections.Counter(helpers.moment_paths(run.abstract_state["opt_state"]))
  trained_paths = {p for p in sizes if component(p) in trains}
  assert set(counts) == trained_paths, sorted(set(counts) ^ trained_paths)[:5]
  assert all(n == 2 for n in counts.values()), counts
  leaves = jax.tree.leaves(run.abstract_state["opt_state"])
  moment_elements = sum(
    x.size for x, param in zip(leaves, helpers.moment_paths(run.abstract_state["opt_state"], with_none=True)) if param
  )
  assert moment_elements == 2 * sum(sizes[p] for p in trained_paths)


def check_frozen_and_trained(init_params, final_params, trains: set[str]):
  init, final = flat_params(init_params), flat_params(final_params)
  assert {component(p) for p in init} == {"vision", "bridge", "llm"}
  for path in init:
    if component(path) in trains and path in NOISE_ONLY:
      continue
    if component(path) in trains:
      assert not np.array_equal(final[path], init[path]), f"{path} should train but did not change"
    else:
      assert np.array_equal(final[path], init[path]), f"{path} is frozen but changed"


def run_three_steps(tok, reference, overrides):
  """Three steps from the reference's init params (fresh optimizer state for this config's labels)."""
  cfg = make_config(tok, overrides)
  run = trainer_lib.build(cfg, single_device_mesh(cfg), tok.image_id)
  params = reference.init["params"]
  state = jax.device_put(
    {"step": np.zeros((), np.int32), "params": params, "opt_state": run.tx.init(params)}, run.state_shardings
  )
  state, metrics = train_steps(run, state, reference.batches)
  assert all(np.isfinite(m["train/loss"]) for m in metrics)
  return run, reference.init, helpers.to_host(state)


@pytest.mark.parametrize(
  "stage,trains", [("stage1", {"bridge"}), ("stage2", {"bridge", "llm"})], ids=["stage1", "stage2"]
)
def test_stage_freezes_exactly(tok, reference, stage, trains):
  run, init, final = run_three_steps(tok, reference, {"stage": stage})
  assert {component(p) for p, t in trained_components(run).items() if t} == trains
  check_frozen_and_trained(init["params"], final["params"], trains)
  check_optimizer_state(run, trains)


def test_full_stage_trains_everything(reference):
  trains = {"vision", "bridge", "llm"}
  assert all(trained_components(reference.run).values())
  check_frozen_and_trained(reference.init["params"], reference.after[-1]["params"], trains)
  check_optimizer_state(reference.run, trains)


def test_trainable_regex_acts_like_stage1(tok, reference):
  run, init, final = run_three_steps(tok, reference, {"stage": "full", "train.trainable": "bridge/.*"})
  assert flat_params(run.labels) == flat_params(
    trainer_lib.build(make_config(tok, {"stage": "stage1"}), run.run.mesh, tok.image_id).labels
  )
  check_frozen_and_trained(init["params"], final["params"], {"bridge"})
  check_optimizer_state(run, {"bridge"})


def test_zero_lr_mult_freezes_the_llm_in_stage2(tok, reference):
  run, init, final = run_three_steps(tok, reference, {"stage": "stage2", "train.lr_mult.llm": 0.0})
  check_frozen_and_trained(init["params"], final["params"], {"bridge"})
  check_optimizer_state(run, {"bridge"})


@pytest.mark.parametrize(
  "pattern,message", [("bridge/.*,llm/nothing/.*", "matches no parameter"), ("bridge/(", "bad regex")]
)
def test_bad_trainable_regex_is_a_user_error(tok, pattern, message):
  cfg = make_config(tok, {"train.trainable": pattern})
  with pytest.raises(UserError, match=message):
    trainer_lib.build(cfg, single_device_mesh(cfg), tok.image_id)


# --- Resume -------------------------------------------------------------------------------------

K = 2  # checkpoint_every; runs go to 2K steps


def loop_config(tok, overrides=None):
  """The loop on all 8 devices (data parallel), with real `shapes` batches."""
  overrides = {
    "mesh.data": -1,
    "data.seq_len": 64,
    "train.steps": 2 * K,
    "train.checkpoint_every": K,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.eval_examples": 8,
    "train.eval_batch_size": 8,
    **(overrides or {}),
  }
  return make_config(tok, overrides)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train = {l["step"]: l["train/loss"] for l in lines if "train/loss" in l}
  evals = {l["step"]: l for l in lines if any(k.startswith("eval/") for k in l)}
  return train, evals


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def checkpoint_data_state(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  try:
    return manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  finally:
    manager.close()


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory):
  """A: stopped at step K (as if preempted), then resumed to 2K. B: unbroken to 2K."""
  root = tmp_path_factory.mktemp("runs")
  a, b = str(root / "a"), str(root / "b")
  for overrides, message in [
    ({"train.trainable": "bridge/.*,lm/.*"}, "matches no parameter"),
    ({"mesh.data": 3}, "mesh"),
    ({"data.sources": "coco"}, "unknown source"),
    ({"evals.shapes_test.data": "llava:nope.json"}, "config.evals.shapes_test: data spec"),
  ]:
    with pytest.raises(UserError, match=message):  # typos first: nothing is written ...
      api.train(loop_config(tok, overrides), a)
    assert not os.path.exists(a), overrides
  api.train(loop_config(tok), a, stop_after=K)  # ... so the corrected command starts
  a_steps_at_stop = checkpoint_steps(a)
  a_metrics_at_stop = read_metrics(a)
  a_eval = api.train(loop_config(tok), a)
  b_eval = api.train(loop_config(tok), b)
  return dict(
    a=a, b=b, a_steps_at_stop=a_steps_at_stop, a_metrics_at_stop=a_metrics_at_stop, a_eval=a_eval, b_eval=b_eval
  )


def test_resumed_run_matches_unbroken_run(runs):
  assert runs["a_steps_at_stop"] == [K]
  train_at_stop, evals_at_stop = runs["a_metrics_at_stop"]
  assert sorted(train_at_stop) == list(range(1, K + 1)) and not evals_at_stop
  a_train, a_evals = read_metrics(runs["a"])
  b_train, b_evals = read_metrics(runs["b"])
  assert sorted(a_train) == sorted(b_train) == list(range(1, 2 * K + 1))
  assert len(set(b_train.values())) == 2 * K  # the loss moves: the comparison means something
  for step in range(1, 2 * K + 1):
    assert a_train[step] == b_train[step], (step, a_train[step], b_train[step])
  assert sorted(a_evals) == sorted(b_evals) == [2 * K]
  assert runs["a_eval"] == runs["b_eval"]
  assert checkpoint_steps(runs["a"]) == checkpoint_steps(runs["b"]) == [K, 2 * K]


def test_checkpoint_holds_the_data_position_of_its_step(runs):
  """A checkpoint at step K must resume at batch K+1, whether or not the run stopped at K."""
  stopped = checkpoint_data_state(runs["a"], K)
  unbroken = checkpoint_data_state(runs["b"], K)
  # batch_size 8, unpacked; shapes at seq_len 64 skips nothing: the next sample is number K * 8.
  assert [s["position"] for s in stopped["processes"]] == [K * 8]
  assert unbroken == stopped


def test_resume_from_a_mid_run_checkpoint_matches_unbroken_run(tok, runs, tmp_path):
  """A crash after the step-K checkpoint of an unbroken run: resuming from it replays K+1..2K."""
  c = str(tmp_path / "c")
  shutil.copytree(runs["b"], c)
  shutil.rmtree(os.path.join(c, "checkpoints", str(2 * K)))
  with open(os.path.join(c, "metrics.jsonl")) as f:
    kept = [line for line in f if json.loads(line)["step"] <= K and "train/loss" in line]
  with open(os.path.join(c, "metrics.jsonl"), "w") as f:
    f.writelines(kept)
  assert_failed_starts_leave_the_run_as_it_was(tok, c)
  api.train(loop_config(tok), c)
  c_train, _ = read_metrics(c)
  b_train, _ = read_metrics(runs["b"])
  assert [c_train[s] for s in range(K + 1, 2 * K + 1)] == [b_train[s] for s in range(K + 1, 2 * K + 1)]


def assert_failed_starts_leave_the_run_as_it_was(tok, workdir):
  """Bad mesh, regex, data: refused, and every file of the run byte-identical (config.json too,
  even where the bad command also changed a field a resume may change)."""
  before = helpers.workdir_files(workdir)
  for overrides, message in [
    ({"mesh.data": 3}, "mesh"),
    ({"train.trainable": "lm/.*"}, "different config"),
    ({"train.steps": 3 * K, "data.threads": -1}, "data.threads"),
    ({"train.steps": 3 * K, "data.sources": "coco"}, "different config"),
  ]:
    with pytest.raises(UserError, match=message):
      api.train(loop_config(tok, overrides), workdir)
    assert helpers.workdir_files(workdir) == before, overrides


def test_resume_with_a_different_config_is_a_user_error(tok, runs):
  with pytest.raises(UserError, match=r"different config \(train\.lr\)"):
    api.train(loop_config(tok, {"train.lr": 3e-4}), runs["a"])


def test_resume_may_change_length_and_cadence(tok, runs, tmp_path):
  shutil.copy(os.path.join(runs["a"], "config.json"), tmp_path / "config.json")
  cfg = loop_config(tok, {"train.steps": 4 * K, "train.eval_every": 7, "train.log_every": 3})
  loop.check_workdir(cfg, str(tmp_path))  # no error
  loop.write_config(cfg, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["steps"] == 4 * K


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_runs_shorter_than_the_warmup_reach_the_peak_lr(steps):
  cfg = helpers.tiny_config({"train.steps": steps, "train.warmup_steps": 50, "train.lr": 1e-3})
  lr = optim.schedule(cfg.train)
  values = [float(lr(s)) for s in range(steps)]
  assert all(np.isfinite(values)) and values[-1] == pytest.approx(1e-3)
