"""What the `vlm-jax` commands share: one-line flag errors, --config loading, sampling flags,
multi-host start, metric printing. Heavy imports (jax, the models) stay inside functions."""

import argparse
import dataclasses
import json
import os
from typing import TYPE_CHECKING

from vlm_jax.errors import UserError

if TYPE_CHECKING:  # at run time only where a config is loaded: `--help` stays fast
  import ml_collections


class Parser(argparse.ArgumentParser):
  def error(self, message):  # argparse prints usage + exits 2; we want one line
    raise UserError(f"{self.prog}: {message}")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Pulls `--config.KEY=VALUE` / `--config.KEY VALUE` out of argv."""
  rest, overrides, i = [], {}, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config.") :].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise UserError(f"{arg}: missing value")
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def load_config(
  spec: str | None,
  overrides: dict[str, str],
  *,
  data: str | None = None,
  eval_data: str | None = None,
  complete: bool = True,
) -> "ml_collections.ConfigDict | None":
  """`--config CONFIG.py[:ARG]` with the --config.KEY=VALUE overrides; `data` replaces its
  data.sources, `eval_data` its evals (one eval, metric auto). complete: then what
  config.model.init_from's checkpoint defines is taken from it (vlm_jax/convert/init_from.py) and
  the config is validated; convert's is not (there the Hugging Face directory gives the model).
  No spec: None, and overrides are an error."""
  from vlm_jax import config as config_lib

  if not spec:
    if overrides:
      raise UserError("--config.KEY=VALUE needs --config")
    return None
  config = config_lib.load_file(spec)
  config_lib.apply_overrides(config, overrides)
  if data:
    config.data.sources = data
  if eval_data:
    config.evals = {config_lib.eval_name(eval_data): config_lib.eval_entry(eval_data)}
  if complete:
    from vlm_jax import build
    from vlm_jax.convert import init_from

    init_from.take_from_checkpoint(config, overrides)
    build.validate(config)
  return config


def maybe_distributed() -> None:
  """Multi-host: each process calls jax.distributed.initialize().

  VLM_JAX_DISTRIBUTED=1 lets jax find its peers (TPU metadata, SLURM, Open MPI); elsewhere
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID say it (jax itself reads only
  the first). CPU devices exchange collectives over gloo.
  """
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address and os.environ.get("VLM_JAX_DISTRIBUTED") != "1":
    return
  import jax

  kwargs = {}
  if address:
    try:
      kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    except (KeyError, ValueError) as e:
      raise UserError(
        f"JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
        f"integers too ({type(e).__name__}: {e})"
      ) from None
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no effect on GPU/TPU devices
  jax.distributed.initialize(address, **kwargs)


def print_metrics(metrics: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps(metrics))
  else:
    for k, v in metrics.items():
      print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def sampling_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--max-new-tokens", type=int, default=None)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: off")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--min-p", type=float, default=0.0)
  p.add_argument("--repetition-penalty", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)


def sampling(args: argparse.Namespace) -> dict:
  """The sampling flags, checked before any model loads."""
  from vlm_jax.infer.generate import Sampling

  chosen = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)
  chosen.check(flags=True)
  if args.max_new_tokens is not None and args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
  return dataclasses.asdict(chosen)
