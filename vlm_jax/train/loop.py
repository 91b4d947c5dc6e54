"""The training loop: read top to bottom.

validate -> tokenizer -> workdir check -> mesh -> model, optimizer, shardings -> data, evaluator
-> restore or init -> write the workdir -> compile -> loop (step, log, eval, checkpoint).

Everything that can fail on a user's input (config, mesh, trainable regexes, data specs, the
checkpoint a run starts from) fails before the workdir is touched: a failed start leaves it as
it was. The loop is handed its evaluator and the reader of `model.init_from` by the layer above
(vlm_jax.api.train), so training imports neither eval nor the Hugging Face converter.
"""

import json
import logging
import os
import signal
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
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.metrics import MetricWriter, ProgressLine
from vlm_jax.train.optim import FROZEN

log = logging.getLogger("vlm_jax")

# Fields that may change when a run is resumed (cadence, length, the levers that change how and
# not what the step computes, config.evals and config.xla); any other change is an error.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.max_to_keep", "train.eval_examples", "train.eval_batch_size", "data.threads",
                     "data.prefetch", "model.remat", "model.attention", "model.attention_block", "model.scan_unroll",
                     "model.loss_chunk")
RESUMABLE_GROUPS = ("evals.", "xla.")


class PeriodicEval(Protocol):
  name: str                                 # metrics go to eval/<name>/...
  every: int                                # steps
  evaluate: Callable[[dict], dict]          # params -> metrics


MakeEvals = Callable[[build_lib.Run, Tokenizer], Sequence[PeriodicEval]]
LoadParams = Callable[[str, build_lib.Run], dict]        # (config.model.init_from, run) -> params


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A resumed run must have the config it was started with (cadence fields aside). Writes nothing."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = config_lib.flatten(json.load(f))
  # A field added to vlm-jax after the run started (e.g. model.anyres.*) had its default then.
  defaults = config_lib.flatten(json.loads(config_lib.to_json(config_lib.base())))
  changed = sorted(k for k, v in config_lib.flatten(json.loads(config_lib.to_json(config))).items()
                   if saved.get(k, defaults.get(k)) != v and k not in RESUMABLE_CHANGES
                   and not k.startswith(RESUMABLE_GROUPS))
  if changed:
    raise UserError(f"--workdir {workdir} holds a run with a different config ({', '.join(changed[:5])}); "
                    "use a new workdir, or the same config to resume")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))


def train(config: ml_collections.ConfigDict, workdir: str, *, evals: MakeEvals | None = None,
          load_params: LoadParams = checkpoint_lib.load_params, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; `evals(run, tokenizer)` makes the periodic evals
  (none without it). `stop_after` ends the process early at that step, as a preemption would (a
  checkpoint is written). Returns the last metrics of each eval."""
  # --- Config, tokenizer, workdir check, mesh ---------------------------------------------------
  build_lib.validate(config)
  tokenizer = Tokenizer.load(config.data.tokenizer)
  build_lib.resolve_model_config(config, tokenizer.vocab_size)
  check_workdir(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  t = config.train
  rows_per_micro = t.batch_size // t.grad_accum
  if rows_per_micro % parallel.batch_divisor(mesh):
    raise UserError(f"config.train.batch_size / grad_accum = {rows_per_micro} rows per micro-batch does not "
                    f"divide over the mesh's data x fsdp = {parallel.batch_divisor(mesh)} devices")

  # --- Model, optimizer, shardings; data and eval -----------------------------------------------
  trainer = trainer_lib.build(config, mesh, tokenizer.image_id)
  run = trainer.run
  data = Batches.from_config(config, tokenizer, run.image_tokens, process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             tile_groups=parallel.batch_divisor(mesh) * t.grad_accum)
  try:
    periodic = list(evals(run, tokenizer)) if evals else []

    # --- Restore or init, and the first batch; only then is the workdir written -----------------
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpoints = (checkpoint_lib.Checkpointer(checkpoint_dir, t.max_to_keep)
                   if os.path.isdir(checkpoint_dir) else None)
    start = checkpoints.latest_step() if checkpoints else None
    if start is not None:
      state, data_state = checkpoints.restore(start, trainer.abstract_state, trainer.state_shardings)
      data.set_state(data_state)
      log.info("resumed from step %d", start)
    elif config.model.init_from:
      start, state = 0, trainer.start(load_params(config.model.init_from, run))
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
  n_trained = sum(x.size for x, l in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(trainer.labels))
                  if l != FROZEN)
  log.info("params: %s total, %s trained (stage %s); mesh %s", f"{n_params:,}", f"{n_trained:,}",
           config.stage, dict(mesh.shape))

  # --- Compile once, before the loop ----------------------------------------------------------
  t0 = time.time()
  train_step = trainer.train_step.lower(state, batch).compile()
  memory = train_step.memory_analysis()
  log.info("train step compiled in %.1fs%s", time.time() - t0,
           f"; temp memory {memory.temp_size_in_bytes / 2**20:.0f} MiB" if memory else "")

  # --- Loop -----------------------------------------------------------------------------------
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  progress = ProgressLine(start, t.steps)
  preempted = _PreemptionFlag()
  tokens_per_step = t.batch_size * config.data.seq_len
  eval_metrics: dict = {}
  step = start
  end = t.steps if stop_after is None else min(t.steps, stop_after)
  while step < end:
    state, metrics = train_step(state, batch)
    step += 1
    if step % t.log_every == 0 or step == end:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["train/tokens_per_s"] = progress.update(step, tokens_per_step)
      metrics["data/skipped"] = sum(data.skipped.values())
      metrics.update({f"data/skipped/{k}": v for k, v in data.skipped.items()})
      writer.write(step, metrics)
      log.info(progress.line(step, metrics))
    for e in periodic:
      if step % e.every == 0 or step == t.steps:
        eval_metrics.update(_eval(e, state, step, writer))
    # Save before fetching the next batch: the saved data position is the next unseen batch.
    if step % t.checkpoint_every == 0 or step == end or preempted:
      checkpoints.save(step, state, data.get_state())
    if step < end and not preempted:
      batch = parallel.global_batch(device_batch(next(data)), mesh)
    if preempted:
      log.warning("stopping at step %d on %s; run again to resume", step, preempted.signal_name)
      break
  preempted.restore()
  data.close()
  checkpoints.wait()
  checkpoints.close()
  writer.close()
  return eval_metrics


def _eval(e: PeriodicEval, state, step: int, writer: "MetricWriter") -> dict:
  t0 = time.time()
  metrics = {f"eval/{e.name}/{k}": v for k, v in e.evaluate(state["params"]).items()}
  writer.write(step, metrics)
  log.info("eval at step %d (%.1fs): %s", step, time.time() - t0,
           ", ".join(f"{k.split('/', 2)[-1]} {v:.4g}" for k, v in metrics.items()))
  return metrics


class _PreemptionFlag:
  """True after SIGTERM/SIGINT: the loop checkpoints and exits cleanly (TPU VMs get SIGTERM)."""

  def __init__(self):
    self.signal_name = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, _frame):
    if self.signal_name is not None:  # second signal: stop now
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def __bool__(self) -> bool:
    return self.signal_name is not None
