"""Configs from files (`path.py[:arg]`), `--config.KEY=VALUE` overrides, and config.json."""

import ast
import importlib.util
import json
import os
import sys

import ml_collections

from vlm_jax.config.evals import complete_evals, eval_entry
from vlm_jax.config.schema import base
from vlm_jax.errors import UserError


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> get_config(arg), its eval entries complete."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config: file not found: {path}")
  module_spec = importlib.util.spec_from_file_location("_vlm_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # a config may build on its neighbours
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a user's file: report where, not a traceback
    raise UserError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from e
  finally:
    sys.path.pop(0)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config: {path} has no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    raise UserError(f"--config: {path}:{arg}: {e}") from e
  if isinstance(config, ml_collections.ConfigDict):  # anything else is validate's to refuse
    complete_evals(config)
  return config


def _parse_value(key: str, text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise UserError(f"--config.{key}: expected true/false, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}: cannot parse {text!r} as {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    value = type(current)(value)
  if current is not None and not isinstance(value, type(current)):
    raise UserError(f"--config.{key}: expected {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Applies {"train.lr": "1e-4", ...}; unknown fields and wrong types are errors."""
  complete_evals(config)  # an entry made in Python with only some fields takes the others too
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    if len(parents) == 2 and parents[0] == "evals" and parents[1] not in config.evals and leaf in eval_entry(""):
      config.evals[parents[1]] = eval_entry("")  # --config.evals.NAME.data=SPEC adds an eval
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f"--config.{key}: unknown config field")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise UserError(f"--config.{key}: unknown config field")
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise UserError(f"--config.{key}: is a group; set one of its fields")
    node[leaf] = _parse_value(key, text, node[leaf])


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of to_json: JSON lists come back as the base config's tuples; the saved evals
  replace the base's, their entries complete."""
  saved = json.loads(text)
  config = base()
  saved_evals = saved.pop("evals", None)
  config.update(_retuple(saved, config))
  if saved_evals is not None:
    config.evals = ml_collections.ConfigDict(saved_evals)
  complete_evals(config)
  return config


def _retuple(d: dict, reference) -> dict:
  out = {}
  for k, v in d.items():
    ref = reference[k] if isinstance(reference, ml_collections.ConfigDict) and k in reference else None
    if isinstance(v, dict):
      out[k] = _retuple(v, ref)
    elif isinstance(v, list) and isinstance(ref, tuple):
      out[k] = tuple(v)
    else:
      out[k] = v
  return out


def flatten(d: dict, prefix: str = "") -> dict:
  """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and tuples compare equal."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out
