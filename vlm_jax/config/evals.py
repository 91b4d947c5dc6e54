"""config.evals: the periodic evals (big_vision style), name -> {data, metric, every, max_examples}.

A config may give an entry only some of its fields. complete_evals fills them in where configs
are made (load_file, apply_overrides, from_json), so a loaded config and its config.json hold
whole entries; eval_entries completes its copies too, for a config made in Python. validate
takes the entries as they are and changes nothing.
"""

import os

import ml_collections

from vlm_jax.errors import UserError


def defaults() -> ml_collections.ConfigDict:
  # Periodic evals (big_vision style): name -> {data, metric, every, max_examples}, each logged
  # as eval/<name>/<metric> (vlm_jax/eval/runner.py); `--eval-data SPEC` replaces them all.
  return ml_collections.ConfigDict({"shapes_test": eval_entry("shapes:test")})


def eval_entry(data: str, metric: str = "auto", every: int = 0, max_examples: int = 0) -> ml_collections.ConfigDict:
  """One periodic eval: a data spec, a metric (auto | vqa | exact | mc | pope | shapes), every
  `every` steps (0: train.eval_every) on its first `max_examples` samples (0: train.eval_examples)."""
  return ml_collections.ConfigDict(dict(data=data, metric=metric, every=every, max_examples=max_examples))


def eval_name(spec: str) -> str:
  """The eval name of a data spec: 'shapes:test' -> 'shapes_test', 'llava:dir/vqa.jsonl' -> 'vqa'."""
  kind, _, rest = spec.partition(":")
  if kind == "llava" and rest:
    return os.path.splitext(os.path.basename(rest.partition(":")[0]))[0] or kind
  return spec.replace(":", "_").replace("/", "_")


def complete_evals(config: ml_collections.ConfigDict) -> None:
  """Gives each entry of config.evals the fields it lacks, eval_entry's defaults (in place)."""
  evals = config.get("evals")
  if not isinstance(evals, ml_collections.ConfigDict):
    return  # not a config validate accepts; it says why
  for entry in evals.values():
    if isinstance(entry, ml_collections.ConfigDict):
      for field, default in eval_entry("").items():
        if field not in entry:
          entry[field] = default


def eval_entries(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """config.evals as complete copies, their zeros filled in from config.train."""
  out = {}
  for name, given in config.evals.items():
    entry = ml_collections.ConfigDict(dict(eval_entry("").to_dict(), **given.to_dict()))
    entry.every = entry.every or config.train.eval_every
    entry.max_examples = entry.max_examples or config.train.eval_examples
    out[name] = entry
  return out


def check(evals: ml_collections.ConfigDict) -> None:
  """Each entry is a group with a data spec and no negative counts; a field it lacks has its default."""
  for name, entry in evals.items():
    if not isinstance(entry, ml_collections.ConfigDict):
      raise UserError(f"config.evals.{name}: expected {{data, metric, every, max_examples}}, got {entry!r:.60}")
    if not entry.get("data"):
      raise UserError(f"config.evals.{name}.data: a data spec is needed (e.g. shapes:test)")
    for field in ("every", "max_examples"):
      if entry.get(field, 0) < 0:
        raise UserError(f"config.evals.{name}.{field} must be >= 0 (0: config.train's), got {entry[field]}")
