"""Zero-shot classification for contrastive models: each class is the mean text embedding of its
prompts (CLIP's prompt ensembling), an image is the class whose embedding is nearest its own.

A data set defines its question kinds, classes, prompts and each example's class (ZEROSHOT_SETS;
today `shapes`: colour and shape of one-shape images, the count of every image). Metrics come as
`<kind>/accuracy` (the loop logs eval/<name>/<kind>/accuracy) with `<kind>/examples`.
"""

import dataclasses
from typing import Callable

import jax
import numpy as np

from vlm_jax import parallel
from vlm_jax.build import Run, in_mesh
from vlm_jax.data import pairs, shapes
from vlm_jax.data.images import Preprocessing
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.models.contrastive import normalize

METRIC = "zeroshot"


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
  classes: Callable[
    [], dict[str, tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]]
  ]  # kind -> (names, prompts per class)
  examples: Callable[[str, int, int, int], list[tuple[np.ndarray, dict[str, int | None]]]]  # (split, seed, size, n)


def _shapes_examples(split: str, seed: int, image_size: int, n: int) -> list[tuple[np.ndarray, dict]]:
  out = []
  for index in range(n):
    ex = shapes.make_example(seed, split, index, image_size)
    out.append((ex.image, {kind: shapes.zeroshot_label(ex, kind) for kind in shapes.ZEROSHOT}))
  return out


ZEROSHOT_SETS = {"shapes": ZeroShotSet(lambda: shapes.ZEROSHOT, _shapes_examples)}


class ZeroShot:
  """One data spec (`shapes:test`) scored for params of one contrastive Run."""

  def __init__(self, run: Run, tokenizer: Tokenizer, spec: str, *, max_examples: int, batch_size: int = 0):
    name, _, split = spec.partition(":")
    if name not in ZEROSHOT_SETS:
      raise UserError(
        f"data spec {spec!r}: zero-shot classification needs a set with classes and prompts "
        f"({', '.join(ZEROSHOT_SETS)})"
      )
    cfg = run.config
    if name == "shapes" and split not in shapes.SPLITS:
      raise UserError(f"data spec {spec!r}: unknown split {split!r} (shapes has {', '.join(shapes.SPLITS)})")
    self.run = run
    self.batch_size = parallel.whole_batch(batch_size or cfg.train.eval_batch_size, run.mesh)
    zs = ZEROSHOT_SETS[name]
    examples = zs.examples(split, cfg.seed, cfg.model.vision.image_size, max_examples)
    preprocess = Preprocessing.from_config(cfg)
    self.images = np.stack([preprocess(image).astype(preprocess.dtype) for image, _ in examples])
    self.labels = {kind: [labels[kind] for _, labels in examples] for kind in zs.classes()}
    self.prompts = {
      kind: [np.stack([pairs.caption_tokens(tokenizer, p, cfg.data.seq_len) for p in prompts]) for prompts in per_class]
      for kind, (_, per_class) in zs.classes().items()
    }
    self._embed = {method: self._embedder(method) for method in ("image_features", "text_features")}

  def _embedder(self, method: str) -> Callable:
    run = self.run
    fn = jax.jit(
      lambda params, x: normalize(run.model.apply({"params": params}, x, method=method)),
      in_shardings=(run.param_shardings, parallel.batch_sharding(run.mesh)),
      out_shardings=parallel.replicated(run.mesh),
    )
    return in_mesh(fn, run.mesh)

  def embed(self, params, method: str, rows: np.ndarray) -> np.ndarray:
    """Normalised embeddings of `rows` (images or tokens), batch_size at a time (the last padded)."""
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start : start + self.batch_size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), axis=0)])
      out.append(np.asarray(self._embed[method](params, parallel.global_batch(padded, self.run.mesh)))[: len(chunk)])
    return np.concatenate(out)

  def __call__(self, params) -> dict[str, float]:
    image_emb = self.embed(params, "image_features", self.images)
    metrics = {}
    for kind, per_class in self.prompts.items():
      counts = [len(p) for p in per_class]
      text_emb = self.embed(params, "text_features", np.concatenate(per_class))
      class_emb = np.stack([e.mean(axis=0) for e in np.split(text_emb, np.cumsum(counts)[:-1])])
      class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
      predicted = np.argmax(image_emb @ class_emb.T, axis=1)
      scored = [(p, label) for p, label in zip(predicted, self.labels[kind]) if label is not None]
      metrics[f"{kind}/examples"] = len(scored)
      if scored:
        metrics[f"{kind}/accuracy"] = float(np.mean([p == label for p, label in scored]))
    return metrics
