"""lmms-eval's model interface for vlm-jax checkpoints, so its benchmarks run on our models:

    pip install 'vlm-jax[lmms]'
    lmms-eval --model vlm_jax --model_args checkpoint=WORKDIR,batch_size=8 --tasks pope,mmbench_en_dev

lmms-eval finds the class through the `lmms_eval.models` entry point in pyproject.toml.
`generate_until` answers with greedy decoding (or sampling, as the task's generation kwargs say)
and cuts at the task's stop strings; `loglikelihood` is Model.loglikelihood (multiple-choice
tasks rank options by it). One process: the model is sharded over this host's devices.
"""

import json
from typing import Sequence

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

import vlm_jax
from vlm_jax.errors import UserError
from vlm_jax.eval.progress import ProgressBar

MODEL_ID = "vlm_jax"


def manifest():
  """The entry point's payload: lmms-eval's registration of this class as `--model vlm_jax`."""
  from lmms_eval.models.registry_v2 import ModelManifest

  return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VlmJax")


def cut_at(text: str, until: Sequence[str]) -> str:
  """The text before the first of the stop strings."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


class VlmJax(lmms):
  """model_args: checkpoint (a workdir, step dir or Hugging Face LLaVA dir), batch_size,
  max_new_tokens (when a task does not say), dtype (e.g. float32)."""

  def __init__(
    self,
    checkpoint: str,
    batch_size: int | str = 8,
    max_new_tokens: int | str = 128,
    dtype: str | None = None,
    **unused,
  ):
    super().__init__()
    self.model = vlm_jax.load(checkpoint, dtype=dtype)
    self.batch_size = int(batch_size)
    self.max_new_tokens = int(max_new_tokens)
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise UserError(f"model_args: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")

  def _visuals(self, doc_to_visual, doc_id, task: str, split: str) -> list:
    if doc_to_visual is None:
      return []
    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
    visuals = [v for v in (visuals or []) if v is not None]
    if any(isinstance(v, (str, dict)) for v in visuals):
      raise UserError(f"vlm_jax: task {task!r} gives videos or audio; vlm-jax models read images")
    return visuals

  def generate_until(self, requests: list[Instance]) -> list[str]:
    """requests[i].args: (context, generation kwargs, doc_to_visual, doc_id, task, split)."""
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):  # one batch shares its generation kwargs
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
    progress = ProgressBar("lmms generate")
    for indices in groups.values():
      kwargs = dict(requests[indices[0]].args[1])
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      sampling = {}
      if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
        sampling = dict(temperature=float(kwargs["temperature"]), top_p=float(kwargs.get("top_p") or 1.0))
      max_new = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
      indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))  # similar lengths together
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start : start + self.batch_size]
        contexts = [requests[i].args[0] for i in chunk]
        images = [self._visuals(*requests[i].args[2:6]) for i in chunk]
        for i, text in zip(chunk, self.model.generate(images, contexts, max_new, **sampling)):
          out[i] = cut_at(text, until)
        progress(sum(x is not None for x in out), len(requests))
    return out

  def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
    """requests[i].args: (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)."""
    out: list[tuple[float, bool]] = []
    progress = ProgressBar("lmms loglikelihood")
    for start in range(0, len(requests), self.batch_size):
      chunk = [r.args for r in requests[start : start + self.batch_size]]
      contexts = [a[0] for a in chunk]
      continuations = [a[1] if isinstance(a[1], str) else a[1](self.task_dict[a[4]][a[5]][a[3]]) for a in chunk]
      images = [self._visuals(*a[2:6]) for a in chunk]
      out.extend(self.model.loglikelihood(images, contexts, continuations))
      progress(len(out), len(requests))
    return out

  def generate_until_multi_round(self, requests) -> list[str]:
    raise NotImplementedError("vlm_jax: multi-round generation is not supported; use generate_until tasks")
