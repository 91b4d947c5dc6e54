"""Held-out evaluation: token loss on the answers and answer accuracy by greedy decoding."""

from collections import defaultdict
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import parallel
from vlm_jax.data import anyres_batch, pipeline, shapes, templates
from vlm_jax.data import images as images_lib
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.infer.generate import Greedy
from vlm_jax.train.build import Run

MAX_ANSWER_TOKENS = 8


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
      self.images = np.stack([images_lib.preprocess(e.image, cfg.model.vision.image_size,
                                                    cfg.data.image_mean, cfg.data.image_std)
                              for e in self.examples])
    self.greedy = Greedy(run.model, run.mesh, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

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
        batch = pipeline.collate(encoded, [None] * len(chunk) if self.anyres else list(chunk_images),
                                 cfg.data.seq_len, tok.pad_id, image_size=cfg.model.vision.image_size)
        batch = {k: _pad_rows(v, self.batch_size) for k, v in batch.items()}
        if self.anyres:
          batch["images"] = self.anyres.collate_rows(
              list(chunk_images) + [None] * (self.batch_size - len(chunk)), cfg.data.seq_len)
        out = self.run.eval_step(params, parallel.global_batch(batch, self.run.mesh))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
        prompts = [templates.encode_prompt(e.turns[0][1], tok, n, cfg.data.template)
                   for e, n in zip(chunk, n_tokens)]
        pixels = (self.anyres.collate_rows(chunk_images, cfg.data.seq_len) if self.anyres
                  else chunk_images[:, None])
        answers = self.greedy(params, prompts, pixels, MAX_ANSWER_TOKENS)
        for e, ids in zip(chunk, answers):
          correct[e.kind].append(shapes.answer_matches(tok.decode(ids), e.answer))
    every = [c for kind in correct.values() for c in kind]
    metrics = {"loss": loss_sum / max(count, 1.0), "accuracy": float(np.mean(every)),
               "examples": len(every)}
    metrics.update({f"accuracy/{kind}": float(np.mean(v)) for kind, v in sorted(correct.items())})
    return metrics


def evaluator_for(run: Run, tokenizer: Tokenizer, spec: str, n: int) -> Evaluator:
  cfg = run.config
  examples = pipeline.eval_examples(spec, n, seed=cfg.seed, image_size=cfg.model.vision.image_size,
                                    image_position=cfg.data.image_position)
  return Evaluator(run, tokenizer, examples)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads with all-zero rows (no tokens, no loss) up to `rows`."""
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)]) if len(x) < rows else x
