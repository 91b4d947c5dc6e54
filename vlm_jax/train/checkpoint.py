"""Orbax checkpoints of the train state together with the data-iterator state."""

import os

import jax
import orbax.checkpoint as ocp

from vlm_jax.build import Run
from vlm_jax.errors import UserError


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """DIR/checkpoints/<step>/{state, data}; keeps the newest `max_to_keep`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, dict]:
    """Restores into the given shardings (which may differ from the ones it was saved with)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(abstract_state, shardings)),
        data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_params(self, step: int, abstract_params, shardings):
    """Only the params (what inference and export need; converted checkpoints hold nothing else)."""
    target = {"params": _abstract(abstract_params, shardings)}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return restored["state"]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def resolve(path: str) -> tuple[str, int | None]:
  """--checkpoint PATH -> (workdir, step): a workdir (latest step) or one of its step directories.

  (A Hugging Face directory is the third kind of PATH; the layer above, vlm_jax.load and
  convert, checks for it first.)
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"--checkpoint: no such file or directory: {path}")
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
    return path, None
  parent = os.path.dirname(path)
  workdir = os.path.dirname(parent)
  if (os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit()
      and os.path.isfile(os.path.join(workdir, "config.json"))):
    return workdir, int(os.path.basename(path))
  if os.path.isfile(os.path.join(path, "config.json")) and any(
      f.endswith(".safetensors") for f in os.listdir(path)):
    raise UserError(f"--checkpoint: {path} is a Hugging Face model directory, not a vlm-jax workdir "
                    "(vlm_jax.load reads it directly; `vlm-jax convert --from-hf` converts it)")
  raise UserError(f"--checkpoint: {path} is neither a vlm-jax workdir (config.json + checkpoints/) "
                  "nor one of its checkpoints/<step> directories")


def read_params(workdir: str, step: int | None, run: Run, where: str) -> tuple[dict, int]:
  """(params, step) of a workdir's step (None: its latest) in the run's shardings, which they
  must fit. Params only: inference needs no optimizer state (converted checkpoints have none)."""
  checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpoints.latest_step() if step is None else step
    if step is None or step not in checkpoints.manager.all_steps():
      raise UserError(f"{where}: no checkpoint {'yet' if step is None else step} in {workdir}/checkpoints")
    try:
      return checkpoints.restore_params(step, run.abstract_params, run.param_shardings), step
    except (ValueError, KeyError) as e:  # orbax: shapes or tree differ from the model's
      raise UserError(f"{where}: its params do not fit this model ({str(e).strip().splitlines()[0][:200]})") from None
  finally:
    checkpoints.close()


def load_params(path: str, run: Run):
  """The params of PATH (a workdir or one of its step directories) in the run's shardings.
  (vlm_jax.convert.hf_import.load_params also reads Hugging Face directories.)"""
  workdir, step = resolve(path)
  return read_params(workdir, step, run, path)[0]
