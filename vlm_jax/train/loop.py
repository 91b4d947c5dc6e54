"""The training loop: read top to bottom.

validate -> tokenizer -> workdir check -> mesh -> model, optimizer, shardings -> data, evaluator
-> restore (onto this mesh and process count) or init -> write the workdir -> compile -> loop
(step, agree on stopping, log, eval, checkpoint) -> wait for the last checkpoint.

Everything that can fail on a user's input (config, a workdir that cannot be written, mesh,
trainable regexes, data specs, the checkpoint a run starts from) fails before the workdir is
touched: a failed start leaves it as it was. A signal stops every process after the same step
with a checkpoint of it (train/preemption.py). The loop is handed its evaluator and the reader
of `model.init_from` by the layer above (vlm_jax.api.train), so training imports neither eval
nor the Hugging Face converter.
"""

import json
import logging
import time
from typing import Callable, Protocol, Sequence

import jax
import ml_collections

from vlm_jax import build as build_lib
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.data.pipeline import Batches, device_batch
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.files import as_path, check_output_dir
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.metrics import MetricWriter, ProgressLine
from vlm_jax.train.optim import FROZEN
from vlm_jax.train.preemption import StopSignal

log = logging.getLogger("vlm_jax")

# Fields that may change when a run is resumed (cadence, length, the levers that change how and
# not what the step computes, the mesh, config.evals and config.xla); any other change is an error.
RESUMABLE_CHANGES = (
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.max_to_keep",
  "train.eval_examples",
  "train.eval_batch_size",
  "data.threads",
  "data.prefetch",
  "model.remat",
  "model.attention",
  "model.attention_block",
  "model.scan_unroll",
  "model.loss_chunk",
)
RESUMABLE_GROUPS = ("evals.", "xla.", "mesh.")
WORKDIR_DIRS, WORKDIR_FILES = ("checkpoints", "tensorboard"), ("config.json", "metrics.jsonl")


class PeriodicEval(Protocol):
  name: str  # metrics go to eval/<name>/...
  every: int  # steps
  evaluate: Callable[[dict], dict]  # params -> metrics


MakeEvals = Callable[[build_lib.Run, Tokenizer], Sequence[PeriodicEval]]
LoadParams = Callable[[str, build_lib.Run], dict]  # (config.model.init_from, run) -> params


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The workdir can be written, and a resumed run has the config it was started with (the
  fields it may change aside: returned as "name: saved -> now"). Writes nothing."""
  check_output_dir(workdir, "--workdir", WORKDIR_DIRS, WORKDIR_FILES)
  path = as_path(workdir) / "config.json"
  if not path.exists():
    return []
  saved = config_lib.flatten(json.loads(path.read_text()))
  # A field added to vlm-jax after the run started (e.g. model.anyres.*) had its default then.
  defaults = config_lib.flatten(json.loads(config_lib.to_json(config_lib.base())))
  now = config_lib.flatten(json.loads(config_lib.to_json(config)))
  differ = sorted(k for k, v in now.items() if saved.get(k, defaults.get(k)) != v)
  refused = [k for k in differ if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_GROUPS)]
  if refused:
    raise UserError(
      f"--workdir {workdir} holds a run with a different config ({', '.join(refused[:5])}); "
      "use a new workdir, or the same config to resume"
    )
  return [f"{k}: {saved.get(k, defaults.get(k))} -> {now[k]}" for k in differ]


def _layouts_match(compiled, args) -> bool:
  """Whether the arrays have the layouts the executable was compiled for. XLA:CPU makes 4-bit
  arrays (QLoRA's nf4 codes) unpacked but compiles for packed ones, which an executable refuses;
  the jitted step (compiled once more, on its first call) takes them. An input the step does not
  read has no layout (None) and takes any."""
  formats = jax.tree.leaves(compiled.input_formats[0])
  arrays = jax.tree.leaves(args)
  match = all(f.layout is None or f.layout == x.format.layout for f, x in zip(formats, arrays))
  if not match:
    log.info("the arrays' layouts differ from the compiled step's (4-bit values on CPU): it runs through jit")
  return match


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    root = as_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config_lib.to_json(config))


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  evals: MakeEvals | None = None,
  load_params: LoadParams = checkpoint_lib.load_params,
  stop_after: int | None = None,
) -> dict:
  """Trains (or resumes) the run in `workdir`; `evals(run, tokenizer)` makes the periodic evals
  (none without it). `stop_after` ends the process early at that step, as a preemption would (a
  checkpoint is written). Returns the last metrics of each eval."""
  # --- Config, tokenizer, workdir check, mesh ---------------------------------------------------
  build_lib.validate(config)
  tokenizer = Tokenizer.load(config.data.tokenizer)
  build_lib.resolve_model_config(config, tokenizer.vocab_size, tokenizer.eos_id)
  changes = check_workdir(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  t = config.train
  rows_per_micro = t.batch_size // t.grad_accum
  if rows_per_micro % parallel.batch_divisor(mesh):
    raise UserError(
      f"config.train.batch_size / grad_accum = {rows_per_micro} rows per micro-batch does not "
      f"divide over the mesh's data x fsdp = {parallel.batch_divisor(mesh)} devices"
    )

  # --- Model, optimizer, shardings; data and eval -----------------------------------------------
  trainer = trainer_lib.build(config, mesh, tokenizer.image_id)
  run = trainer.run
  data = Batches(
    config,
    tokenizer,
    run.image_tokens,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    tile_groups=parallel.batch_divisor(mesh) * t.grad_accum,
    layout=run.task.layout,
  )
  try:
    periodic = list(evals(run, tokenizer)) if evals else []

    # --- Restore or init, and the first batch; only then is the workdir written -----------------
    checkpoint_dir = as_path(workdir) / "checkpoints"
    checkpoints = checkpoint_lib.Checkpointer(checkpoint_dir, t.max_to_keep) if checkpoint_dir.is_dir() else None
    start = checkpoints.latest_step() if checkpoints else None
    if start is not None:
      state, data_states = checkpoints.restore(start, trainer.abstract_state, trainer.state_shardings)
      moved = data.continue_from(data_states, jax.process_index())
      log.info(
        "resumed from step %d on %d process(es) x %d devices%s",
        start,
        jax.process_count(),
        jax.local_device_count(),
        "".join(f"\n  {line}" for line in changes + [moved] if line),
      )
    elif config.model.init_from or config.model.vision.init_from:
      params = (
        load_params(config.model.init_from, run.plain)
        if config.model.init_from
        else run.plain.init_params(jax.random.key(config.seed))
      )
      if config.model.vision.init_from:
        params = checkpoint_lib.load_vision(config.model.vision.init_from, run.plain, params)
        log.info("ViT from %s", config.model.vision.init_from)
      start, state = 0, trainer.start(params)
    else:
      start, state = 0, trainer.init(jax.random.key(config.seed))
    # Batches go to the device as soon as they are read: the transfer of batch k+1 overlaps step k.
    batch = parallel.global_batch(device_batch(next(data)), mesh)
  except BaseException:
    data.close()
    raise
  write_config(config, workdir)
  checkpoints = checkpoints or checkpoint_lib.Checkpointer(checkpoint_dir, t.max_to_keep)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  n_trained = sum(
    x.size for x, l in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(trainer.labels)) if l != FROZEN
  )
  log.info(
    "params: %s total, %s trained (stage %s); mesh %s",
    f"{n_params:,}",
    f"{n_trained:,}",
    config.stage,
    dict(mesh.shape),
  )

  # --- Compile once, before the loop (signals from here on stop the run with a checkpoint) -----
  with StopSignal(mesh) as stop:
    t0 = time.time()
    compiled = trainer.train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    log.info(
      "train step compiled in %.1fs%s",
      time.time() - t0,
      f"; temp memory {memory.temp_size_in_bytes / 2**20:.0f} MiB" if memory else "",
    )
    train_step = compiled if _layouts_match(compiled, (state, batch)) else trainer.train_step
    try:
      eval_metrics = _loop(
        config, train_step, state, batch, start, data, periodic, checkpoints, workdir, stop, mesh, stop_after
      )
    finally:
      data.close()
      checkpoints.close()
  return eval_metrics


def _loop(
  config,
  train_step,
  state,
  batch,
  start: int,
  data: Batches,
  periodic: Sequence[PeriodicEval],
  checkpoints: checkpoint_lib.Checkpointer,
  workdir: str,
  stop: StopSignal,
  mesh,
  stop_after: int | None,
) -> dict:
  """Steps start+1.. until train.steps, `stop_after`, or a stop all processes agree on; returns
  the last metrics of each eval."""
  t = config.train
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  progress = ProgressLine(start, t.steps)
  tokens_per_step = t.batch_size * config.data.seq_len
  eval_metrics: dict = {}
  step, saved, stopping = start, None, False
  end = t.steps if stop_after is None else min(t.steps, stop_after)
  while step < end:
    state, metrics = train_step(state, batch)
    step += 1
    stopping = stop.agreed()  # once per step: the same answer on every process
    if step % t.log_every == 0 or step == end:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["train/tokens_per_s"] = progress.update(step, tokens_per_step)
      metrics["data/skipped"] = sum(data.skipped.values())
      metrics.update({f"data/skipped/{k}": v for k, v in data.skipped.items()})
      writer.write(step, metrics)
      log.info(progress.line(step, metrics))
    for e in periodic:
      if (step % e.every == 0 or step == t.steps) and not stopping:  # a preemption's grace is short
        eval_metrics.update(_eval(e, state, step, writer))
    # Save before fetching the next batch: the saved data position is the next unseen batch.
    if step % t.checkpoint_every == 0 or step == end or stopping:
      stall, saved = checkpoints.save(step, state, data.get_state()), step
      writer.write(step, {"checkpoint/stall_ms": 1000 * stall})
      log.info("checkpoint %d: writing in the background (the loop waited %.0f ms)", step, 1000 * stall)
    if stopping:
      break
    if step < end:
      batch = parallel.global_batch(device_batch(next(data)), mesh)
  t0 = time.time()
  checkpoints.wait()
  if saved is not None:
    log.info("checkpoint %d complete (waited %.1fs for its files)", saved, time.time() - t0)
  if stopping:
    if not checkpoints.complete(step):
      raise RuntimeError(f"stopping at step {step}: its checkpoint is not in {checkpoints.directory}")
    log.warning(
      "stopped at step %d on %s: checkpoint %d is complete; run the same command to resume",
      step,
      stop.signal_name or "a peer's signal",
      step,
    )
  writer.close()
  return eval_metrics


def _eval(e: PeriodicEval, state, step: int, writer: "MetricWriter") -> dict:
  t0 = time.time()
  metrics = {f"eval/{e.name}/{k}": v for k, v in e.evaluate(state["params"]).items()}
  writer.write(step, metrics)
  log.info(
    "eval at step %d (%.1fs): %s",
    step,
    time.time() - t0,
    ", ".join(f"{k.split('/', 2)[-1]} {v:.4g}" for k, v in metrics.items()),
  )
  return metrics
