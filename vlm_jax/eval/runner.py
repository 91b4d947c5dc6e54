"""Evaluation: greedy answers to the prompts of a data spec, scored by a metric (eval/metrics.py),
and the token loss on the reference answers where the samples carry them as a conversation turn.

Examples go in batches sorted by prompt length (fewer padded positions and compiled prompt
buckets); results come back in input order. The training loop's periodic evals are built from
config.evals here (periodic_evals).
"""

import collections
import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from vlm_jax import parallel
from vlm_jax.build import Run
from vlm_jax.config import eval_entries
from vlm_jax.data import pipeline, sources, templates
from vlm_jax.data.packing import collate_text
from vlm_jax.data.prepare import Prepared, decode_image
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import BadSample, UserError
from vlm_jax.eval import examples as examples_lib
from vlm_jax.eval import metrics as metrics_lib
from vlm_jax.eval import zeroshot
from vlm_jax.infer.generate import Generator
from vlm_jax.infer.inputs import Inputs

log = logging.getLogger("vlm_jax")
NO_IMAGES = np.zeros((0, 1, 1, 3), np.float32)  # images go in separately (pixels)
Progress = Callable[[int, int], None]  # (examples done, total)


@dataclasses.dataclass
class Result:
  metrics: dict  # {"examples", "metric", "accuracy", ...}
  records: list[dict]  # one per example, in input order: index, id, prompt, prediction, answers, score


def metric_for(name: str, examples: Sequence[examples_lib.Example], spec: str) -> tuple[str, str]:
  """(metric, why): `name`, or for auto the one the samples call for."""
  metrics_lib.check_name(name)
  why = "as asked"
  if name == metrics_lib.AUTO:
    name, why = metrics_lib.pick([e.reference for e in examples], spec)
    log.info("eval %s: metric %s (%s)", spec, name, why)
  for e in examples:
    unfit = metrics_lib.METRICS[name].unfit(e.reference)
    if unfit:
      raise UserError(f"data spec {spec!r} sample {e.index} (id {e.key}): {unfit}")
  return name, why


class Evaluator:
  """One data spec scored with one metric for params of one Run; compiled programs are reused
  from call to call."""

  def __init__(
    self,
    run: Run,
    tokenizer: Tokenizer,
    spec: str,
    *,
    metric: str = metrics_lib.AUTO,
    max_examples: int | None = None,
    batch_size: int = 0,
    max_new_tokens: int = 0,
  ):
    cfg = run.config
    options = sources.Options(cfg.seed, cfg.model.vision.image_size, cfg.data.image_position, cfg.data.tfds_dir)
    self.run, self.tokenizer = run, tokenizer
    self.examples, self.skipped = examples_lib.read(spec, options, max_examples)
    self.metric, self.metric_reason = metric_for(metric, self.examples, spec)
    self.max_new_tokens = max_new_tokens or metrics_lib.METRICS[self.metric].max_new_tokens
    self.batch_size = parallel.whole_batch(batch_size or cfg.train.eval_batch_size, run.mesh)
    self.inputs = Inputs(cfg, tokenizer)
    self.generator = Generator(run.model, run.mesh, pad_id=tokenizer.pad_id, context=cfg.model.llm.max_len)
    # Prompt lengths for the batch order (AnyRes: each image counted as one tile, before decoding).
    self.order = sorted(range(len(self.examples)), key=lambda i: -self._length(self.examples[i]))

  def _length(self, e: examples_lib.Example) -> int:
    try:
      return len(
        templates.encode_prompt(
          e.prompt,
          self.tokenizer,
          [self.inputs.image_tokens] * len(e.images),
          self.run.config.data.template,
          history=e.history,
        )
      )
    except BadSample:  # counted when its batch is prepared
      return 0

  def __call__(self, params, *, shuffle_images: bool = False, progress: Progress | None = None) -> Result:
    """shuffle_images pairs each prompt with the previous example's image (a fixed derangement): a
    model that uses the image should then score near chance."""
    images = [e.images for e in self.examples]
    if shuffle_images:
      if any(len(im) != 1 for im in images):
        raise UserError("--shuffle-images: every example needs exactly one image")
      images = images[-1:] + images[:-1]
    predictions: dict[int, str] = {}
    skipped = collections.Counter(self.skipped)
    loss_sum = count = 0.0
    for start in range(0, len(self.order), self.batch_size):
      batch = self._prepare([(i, images[i]) for i in self.order[start : start + self.batch_size]], skipped)
      if batch:
        ids = self.generator(
          params,
          batch["prompts"],
          batch["pixels"],
          max_new_tokens=self.max_new_tokens,
          stop_ids=(self.tokenizer.eos_id,),
        )
        for i, new in zip(batch["rows"], ids):
          predictions[i] = self.tokenizer.decode(new).strip()
        if batch["loss"] is not None:
          out = self.run.eval_step(params, parallel.global_batch(batch["loss"], self.run.mesh))
          loss_sum, count = loss_sum + float(out["loss_sum"]), count + float(out["count"])
      if progress:
        progress(min(start + self.batch_size, len(self.order)), len(self.order))
    return self._result(predictions, skipped, loss_sum / count if count else None)

  def _prepare(self, items: list[tuple[int, tuple]], skipped: collections.Counter) -> dict | None:
    """A batch: prompt ids, pixels and (where references are turns) the teacher-forced rows, padded
    to batch_size rows by repeating the last example (its outputs are dropped)."""
    cfg, tok = self.run.config, self.tokenizer
    rows, prompts, decoded, loss_rows = [], [], [], []
    for i, refs in items:
      e = self.examples[i]
      try:
        ims = [decode_image(ref) for ref in refs]
        prompt = self.inputs.encode_prompt(e.prompt, image=ims, history=e.history)
        if len(prompt) + self.max_new_tokens > cfg.model.llm.max_len:
          raise BadSample("too_long", f"{len(prompt)} prompt tokens")
      except BadSample as err:
        skipped[err.reason] += 1
        continue
      rows.append(i)
      prompts.append(prompt)
      decoded.append(ims)
      loss_rows.append(self._teacher_forced(e, ims))
    if not rows:
      return None
    pad = self.batch_size - len(rows)
    prompts += [prompts[-1]] * pad
    pixels = self.inputs.pixels(decoded + [decoded[-1]] * pad)
    loss = None
    if any(r is not None for r in loss_rows):
      text = collate_text([[r] if r else [] for r in loss_rows] + [[]] * pad, cfg.data.seq_len, tok.pad_id)
      loss = dict(pipeline.device_batch(text), images=pixels)
    return {"rows": rows, "prompts": prompts, "pixels": pixels, "loss": loss}

  def _teacher_forced(self, e: examples_lib.Example, images: list) -> Prepared | None:
    """The conversation with its answer as a loss row (None without an answer turn or beyond seq_len)."""
    if not e.turns:
      return None
    counts = [self.inputs.image_tokens_for(im) for im in images]
    enc = templates.encode_conversation(e.turns, self.tokenizer, counts, self.run.config.data.template)
    if len(enc.tokens) > self.run.config.data.seq_len:
      return None
    return Prepared(e.key, enc.tokens, enc.loss_mask, NO_IMAGES)

  def _result(self, predictions: dict[int, str], skipped: collections.Counter, loss: float | None) -> Result:
    metric = metrics_lib.METRICS[self.metric]
    scored = [i for i in range(len(self.examples)) if i in predictions]
    preds = [predictions[i] for i in scored]
    refs = [self.examples[i].reference for i in scored]
    scores = [metric.score(p, r) for p, r in zip(preds, refs)]
    out = {"examples": len(scored), "metric": self.metric, **metric.summary(preds, refs, scores)}
    if loss is not None:
      out["loss"] = loss
    by_category = collections.defaultdict(list)
    for i, s in zip(scored, scores):
      if self.examples[i].category:
        by_category[self.examples[i].category].append(s)
    out.update({f"accuracy/{c}": float(np.mean(v)) for c, v in sorted(by_category.items())})
    if skipped:
      out["skipped"] = sum(skipped.values())
      out.update({f"skipped/{reason}": n for reason, n in sorted(skipped.items())})
    records = [
      {
        "index": self.examples[i].index,
        "id": self.examples[i].key,
        "prompt": self.examples[i].prompt,
        "prediction": p,
        "answers": list(r.answers),
        "score": s,
      }
      for i, p, r, s in zip(scored, preds, refs, scores)
    ]
    return Result(out, records)


@dataclasses.dataclass(frozen=True)
class PeriodicEval:
  """One entry of config.evals, ready for the training loop."""

  name: str
  every: int
  evaluate: Callable[[dict], dict]  # params -> metrics (numbers only)


def _answers(run: Run, tokenizer: Tokenizer, entry) -> Callable[[dict], dict]:
  evaluator = Evaluator(run, tokenizer, entry.data, metric=entry.metric, max_examples=entry.max_examples)
  return lambda params: _numbers(evaluator(params).metrics)


def _zeroshot(run: Run, tokenizer: Tokenizer, entry) -> Callable[[dict], dict]:
  if entry.metric not in (metrics_lib.AUTO, zeroshot.METRIC):
    raise UserError(f"metric {entry.metric!r}: a contrastive model is scored by {zeroshot.METRIC} (or auto)")
  return zeroshot.ZeroShot(run, tokenizer, entry.data, max_examples=entry.max_examples)


# config.task -> (run, tokenizer, config.evals entry) -> (params -> metrics)
PERIODIC = {"vlm": _answers, "contrastive": _zeroshot}


def periodic_evals(run: Run, tokenizer: Tokenizer) -> list[PeriodicEval]:
  """config.evals, each read and checked now (before the training loop touches the workdir)."""
  out = []
  for name, entry in eval_entries(run.config).items():
    try:
      evaluate = PERIODIC[run.config.task](run, tokenizer, entry)
    except UserError as e:
      raise UserError(f"config.evals.{name}: {e}") from None
    out.append(PeriodicEval(name, entry.every, evaluate))
  return out


def _numbers(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
