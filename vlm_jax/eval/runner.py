"""Held-out evaluation: token loss on the answers and answer accuracy by greedy decoding."""

from collections import defaultdict
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import parallel
from vlm_jax.build import Run
from vlm_jax.data import anyres_batch, pipeline, shapes, templates
from vlm_jax.data import images as images_lib
from vlm_jax.data.packing import collate_text
from vlm_jax.data.prepare import Prepared
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.infer.generate import Generator

MAX_ANSWER_TOKENS = 8
NO_IMAGES = np.zeros((0, 1, 1, 3), np.float32)  # images go in separately (_pixels)


class Evaluator:
  """Evaluates params of one Run on a fixed list of examples; compiled once, reused each eval."""

  def __init__(self, run: Run, tokenizer: Tokenizer, examples: Sequence[shapes.Example]):
    self.run, self.tokenizer, self.examples = run, tokenizer, list(examples)
    cfg = run.config
    self.batch_size = _round_up(cfg.train.eval_batch_size, parallel.batch_divisor(run.mesh))
    self.anyres = anyres_batch.for_config(cfg)
    if self.anyres:  # a list of Tiled: each image has its own plan and token count
      self.images = [self.anyres.prepare(e.image) for e in self.examples]
    else:
      preprocessing = images_lib.Preprocessing.from_config(cfg)
      self.images = np.stack([preprocessing(e.image) for e in self.examples])
    self.generator = Generator(run.model, run.mesh, pad_id=tokenizer.pad_id, context=cfg.model.llm.max_len)

  def __call__(self, params, *, shuffle_images: bool = False) -> dict[str, float]:
    """-> {"loss", "accuracy", "accuracy/<question kind>", "examples"}.

    shuffle_images pairs each question with another example's image (a fixed derangement): a
    model that uses the image should then score near chance.
    """
    cfg, tok = self.run.config, self.tokenizer
    images = self.images
    if shuffle_images:
      images = self.images[-1:] + self.images[:-1] if self.anyres else np.roll(self.images, 1, axis=0)
    loss_sum = count = 0.0
    correct: dict[str, list[bool]] = defaultdict(list)
    with jax.set_mesh(self.run.mesh), nn.logical_axis_rules(parallel.RULES):
      for start in range(0, len(self.examples), self.batch_size):
        chunk = self.examples[start:start + self.batch_size]
        chunk_images = images[start:start + self.batch_size]
        n_tokens = ([im.plan.tokens for im in chunk_images] if self.anyres
                    else [self.run.image_tokens] * len(chunk))
        encoded = [templates.encode_conversation(e.turns, tok, n, cfg.data.template)
                   for e, n in zip(chunk, n_tokens)]
        rows = [[Prepared(str(start + i), enc.tokens, enc.loss_mask, NO_IMAGES)] for i, enc in enumerate(encoded)]
        batch = pipeline.device_batch(collate_text(rows, cfg.data.seq_len, tok.pad_id))
        batch = {k: _pad_rows(v, self.batch_size) for k, v in batch.items()}
        batch["images"] = self._pixels(chunk_images, self.batch_size)
        out = self.run.eval_step(params, parallel.global_batch(batch, self.run.mesh))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
        prompts = [templates.encode_prompt(e.turns[0][1], tok, n, cfg.data.template)
                   for e, n in zip(chunk, n_tokens)]
        answers = self.generator(params, prompts, self._pixels(chunk_images, len(chunk)),
                                 max_new_tokens=MAX_ANSWER_TOKENS, stop_ids=(tok.eos_id,))
        for e, ids in zip(chunk, answers):
          correct[e.kind].append(shapes.answer_matches(tok.decode(ids), e.answer))
    every = [c for kind in correct.values() for c in kind]
    metrics = {"loss": loss_sum / max(count, 1.0), "accuracy": float(np.mean(every)),
               "examples": len(every)}
    metrics.update({f"accuracy/{kind}": float(np.mean(v)) for kind, v in sorted(correct.items())})
    return metrics

  def _pixels(self, images, rows: int):
    """A chunk's images as the model takes them, padded to `rows` rows."""
    if self.anyres:
      return self.anyres.collate_rows([[im] for im in images] + [[]] * (rows - len(images)),
                                      self.run.config.data.seq_len)
    return _pad_rows(images[:, None], rows)


def eval_examples(spec: str, n: int, *, seed: int, image_size: int,
                  image_position: str = "before") -> list[shapes.Example]:
  """The first n examples of a `shapes` split: a fixed held-out set (eval reads shapes only)."""
  kind, _, split = spec.partition(":")
  split = split or "train"
  if kind != "shapes" or split not in shapes.SPLITS:
    raise UserError(f"eval data spec {spec!r}: the periodic eval reads shapes[:SPLIT] only in this version "
                    f"(splits: {', '.join(shapes.SPLITS)})")
  return [shapes.make_example(seed, split, i, image_size, image_position) for i in range(n)]


def evaluator_for(run: Run, tokenizer: Tokenizer, spec: str, n: int) -> Evaluator:
  cfg = run.config
  examples = eval_examples(spec, n, seed=cfg.seed, image_size=cfg.model.vision.image_size,
                           image_position=cfg.data.image_position)
  return Evaluator(run, tokenizer, examples)


def periodic_evaluator(run: Run, tokenizer: Tokenizer) -> Evaluator:
  """The training loop's eval: config.data.eval_sources, its first config.train.eval_examples."""
  return evaluator_for(run, tokenizer, run.config.data.eval_sources, run.config.train.eval_examples)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads with all-zero rows (no tokens, no loss) up to `rows`."""
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)]) if len(x) < rows else x
