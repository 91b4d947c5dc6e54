"""Orbax checkpoints of the train state together with every process's data-iterator state.

Saves are asynchronous (orbax): `save` returns once the arrays are copied off the devices, and
the files are written in the background while training goes on. A step counts only once it is
complete (renamed into place from a temporary directory; in a bucket, its commit marker), so a
save cut short (a second signal, a killed machine) leaves the previous checkpoint the latest.
The workdir may be any path etils.epath opens (local, gs://).
"""

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vlm_jax import config as config_lib
from vlm_jax.build import Run
from vlm_jax.data.tokenizer import BUILTIN
from vlm_jax.errors import UserError
from vlm_jax.files import as_path, is_remote


# Tensorstore has no 4-bit types: 4-bit arrays (QLoRA's nf4 codes) are stored as bytes.
STORED_AS = {jnp.dtype(jnp.uint4): jnp.dtype(jnp.uint8), jnp.dtype(jnp.int4): jnp.dtype(jnp.int8)}


def _stored(dtype) -> jnp.dtype:
  return STORED_AS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def _to_storage(tree):
  return jax.tree.map(lambda x: x.astype(_stored(x.dtype)) if _stored(x.dtype) != x.dtype else x, tree)


def _from_storage(tree, abstract):
  return jax.tree.map(lambda x, a: x.astype(a.dtype) if x.dtype != a.dtype else x, tree, abstract)


def _abstract(tree, shardings):
  """The restore target: the tree's shapes in `shardings`, in their stored dtypes."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, _stored(x.dtype), sharding=s), tree, shardings)


# Orbax saves a replicated array "replica-parallel": each replica writes a slice, which it cuts with a
# jit compiled per device and shape. For small arrays those compiles cost far more than they save
# (a run's first save stalled 3.7 s on 8 CPU devices for 79k params; 0.06 s without), so a replica
# writes an array alone unless each replica's slice would reach this size.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
  """jax.Arrays saved as orbax's default handler does, but small ones by a single replica. Once a
  process, without orbax's warning that its own handler is replaced. (No ArrayMetadata store: it
  only records typed PRNG keys, which the train state does not hold.)"""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True,
    )
  finally:
    absl_logger.setLevel(level)


def _gather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order (a collective: all call it)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


class Checkpointer:
  """DIR/checkpoints/<step>/{state, data}; keeps the newest `max_to_keep`. `data` holds the
  data-iterator state of every process ({"processes": [...]}), so a run can continue on another
  process count."""

  def __init__(self, directory: str, max_to_keep: int = 2, read_only: bool = False):
    """read_only: for readers (inference, eval) of a workdir a run may be writing to; only the
    writer removes the temporary directories of saves cut short."""
    self.directory = as_path(directory)
    if not read_only:
      _register_array_handler()
    # (Not orbax's read_only option: it logs three warnings on every open.)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(create=False)
      if read_only
      else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict) -> float:
    """Starts saving `step` (every process calls it) and returns the seconds the caller was held:
    the copy off the devices, and any wait for the previous save still being written."""
    data = {"processes": _gather_json(data_state)}
    jax.block_until_ready(state)  # the step's own time is not the save's
    start = time.perf_counter()
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(_to_storage(state)), data=ocp.args.JsonSave(data)),
      force=True,
    )
    return time.perf_counter() - start

  def restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, list[dict]]:
    """(state in the given shardings, which may differ from the saved ones; the data states of
    the processes that saved it)."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(abstract_state, shardings)), data=ocp.args.JsonRestore()
      ),
    )
    data = restored["data"]
    state = _from_storage(restored["state"], abstract_state)
    # Before per-process states were kept, process 0's state was saved alone (and used by all).
    return state, data["processes"] if "processes" in data else [data] * jax.process_count()

  def complete(self, step: int) -> bool:
    """`step` is finished on disk (after wait())."""
    self.manager.reload()
    return step in self.manager.all_steps()

  def restore_params(self, step: int, abstract_params, shardings):
    """Only the params (what inference and export need; converted checkpoints hold nothing else)."""
    target = {"params": _abstract(abstract_params, shardings)}
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
      ),
    )
    return _from_storage(restored["state"]["params"], abstract_params)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def resolve(path: str) -> tuple[str, int | None]:
  """--checkpoint PATH -> (workdir, step): a workdir (latest step) or one of its step directories,
  local or in a bucket (gs://).

  (A Hugging Face directory is the third kind of PATH; the layer above, vlm_jax.load and
  convert, checks for it first.)
  """
  root = as_path(path)
  if not root.exists():
    raise UserError(f"--checkpoint: no such file or directory: {root}")
  if (root / "config.json").is_file() and (root / "checkpoints").is_dir():
    return str(root), None
  workdir = root.parent.parent
  if root.parent.name == "checkpoints" and root.name.isdigit() and (workdir / "config.json").is_file():
    return str(workdir), int(root.name)
  if (root / "config.json").is_file() and any(f.name.endswith(".safetensors") for f in root.iterdir()):
    raise UserError(
      f"--checkpoint: {root} is a Hugging Face model directory, not a vlm-jax workdir "
      "(vlm_jax.load reads it directly; `vlm-jax convert --from-hf` converts it)"
    )
  raise UserError(
    f"--checkpoint: {root} is neither a vlm-jax workdir (config.json + checkpoints/) "
    "nor one of its checkpoints/<step> directories"
  )


def read_params(workdir: str, step: int | None, run: Run, where: str, part=None) -> tuple[dict, int]:
  """(params, step) of a workdir's step (None: its latest) in the run's shardings, which they
  must fit. Params only: inference needs no optimizer state (converted checkpoints have none).
  part: (abstract params, shardings) of a subtree to read instead of the run's whole tree."""
  abstract, shardings = part or (run.abstract_params, run.param_shardings)
  checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = checkpoints.latest_step() if step is None else step
    if step is None or step not in checkpoints.manager.all_steps():
      raise UserError(f"{where}: no checkpoint {'yet' if step is None else step} in {workdir}/checkpoints")
    try:
      return checkpoints.restore_params(step, abstract, shardings), step
    except (ValueError, KeyError) as e:  # orbax: shapes or tree differ from the model's
      raise UserError(f"{where}: its params do not fit this model ({str(e).strip().splitlines()[0][:200]})") from None
  finally:
    checkpoints.close()


def in_workdir(spec: str, workdir: str) -> str:
  """A relative tokenizer path that exists inside the workdir (a converted model's hf/) is read there."""
  if spec in BUILTIN or os.path.isabs(spec) or is_remote(spec) or not (as_path(workdir) / spec).exists():
    return spec
  return str(as_path(workdir) / spec)


def load_params(path: str, run: Run):
  """The params of PATH (a workdir or one of its step directories) in the run's shardings.
  (vlm_jax.convert.hf_import.load_params also reads Hugging Face directories.)"""
  workdir, step = resolve(path)
  return read_params(workdir, step, run, path)[0]


# The ViT fields a tower taken by config.model.vision.init_from must share (depth may be smaller:
# its first blocks are taken, as LLaVA reads a layer before the last).
VISION_SHAPE = ("flavour", "image_size", "patch_size", "width", "heads", "mlp_dim")


def load_vision(path: str, run: Run, params: dict) -> dict:
  """params with their ViT ("vision") taken from PATH, a workdir or step directory of any task
  (a contrastive run's: config.model.vision.init_from), in the run's shardings. Blocks past this
  config's depth are dropped; a final LayerNorm is taken where both have one."""
  where = "config.model.vision.init_from"
  workdir, step = resolve(path)
  theirs = config_lib.from_json((as_path(workdir) / "config.json").read_text()).model.vision
  mine = run.config.model.vision
  differ = [f"{k} {theirs[k]} vs {mine[k]}" for k in VISION_SHAPE if theirs[k] != mine[k]]
  if mine.depth > theirs.depth:
    differ.append(f"depth {theirs.depth} < {mine.depth}")
  if differ:
    raise UserError(f"{where}: the ViT of {path} does not fit this config's ({', '.join(differ)})")
  ours, shardings = run.abstract_params["vision"], run.param_shardings["vision"]
  if not theirs.final_norm:
    ours, shardings = ({k: v for k, v in tree.items() if k != "final_norm"} for tree in (ours, shardings))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct((theirs.depth,) + x.shape[1:], x.dtype), ours["layers"])
  target = dict(ours, layers=target)  # (ours has a final_norm only where this config has one)
  part = ({"vision": target}, {"vision": {k: shardings[k] for k in target}})
  vision = read_params(workdir, step, run, where, part)[0]["vision"]
  vision["layers"] = jax.tree.map(
    lambda x, s: jax.jit(lambda a: a[: mine.depth], out_shardings=s)(x), vision["layers"], shardings["layers"]
  )
  return dict(params, vision=dict(params["vision"], **vision))
