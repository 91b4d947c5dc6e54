"""The checks every owner shares: a field's value is one of its choices; a config has no unknown fields."""

import ml_collections

from vlm_jax.config.evals import eval_entry
from vlm_jax.errors import UserError


def check_one_of(field: str, value, choices) -> None:
  """A field whose value must be one of `choices` (a tuple or a registry's keys)."""
  if value not in choices:
    raise UserError(f"{field}: {value!r} is not one of {', '.join(choices)}")


def check_fields(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every field of `config` must exist in the base config (typos are errors, not silent no-ops)."""
  for key, value in config.items():
    where = f"{prefix}{key}"
    if where.startswith("evals.") and where.count(".") == 1:  # a free name: check against an entry
      reference = ml_collections.ConfigDict({key: eval_entry("")})
    if key not in reference:
      raise UserError(f"config field {where}: unknown config field")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
      check_fields(value, reference[key], where + ".")
