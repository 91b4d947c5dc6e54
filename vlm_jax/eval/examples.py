"""Eval examples from any data spec: the prompt (the conversation up to its last assistant turn,
images included) and what the answer is scored against (that turn, or the sample's "answers";
"choices" for multiple choice). Host side: images stay references until a batch needs them."""

import collections
import dataclasses

from vlm_jax.data import IMAGE
from vlm_jax.data import sources as sources_lib
from vlm_jax.data.sources import ImageRef
from vlm_jax.errors import BadSample, UserError
from vlm_jax.eval.metrics import LETTERS, Reference

SHAPES_EXAMPLES = 512  # the default size of an eval over the endless shapes sets
# LLaVA's multiple-choice prompt (MMBench, ScienceQA), used when a question does not list its choices.
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Example:
  index: int  # the sample's index in the data
  key: str  # its id
  history: tuple[tuple[str, str], ...]  # earlier (user, answer) rounds
  prompt: str  # the user turn to answer
  images: tuple[ImageRef, ...]
  reference: Reference
  category: str = ""
  turns: tuple[tuple[str, str], ...] = ()  # the conversation with its answer, for the answer loss; () if none


def with_choices(question: str, choices: tuple[str, ...]) -> str:
  """The question, followed by its lettered choices unless it already lists every one."""
  if all(c in question for c in choices):
    return question
  lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
  return "\n".join([question, *lines, CHOICE_INSTRUCTION])


def from_sample(sample: sources_lib.Sample, index: int) -> Example:
  """BadSample if the conversation cannot be a prompt; UserError if there is nothing to score against."""
  turns = list(sample.turns)
  answer = turns.pop()[1] if turns and turns[-1][0] == "assistant" else None
  answers = tuple(sample.answers) or ((answer,) if answer is not None else ())
  if not answers:
    raise UserError(
      f"sample {index} (id {sample.key}): no reference answer: end the conversation with an "
      'assistant turn or give "answers"'
    )
  if not turns or len(turns) % 2 == 0 or turns[-1][0] != "user":
    raise BadSample("format", f"id {sample.key}: the conversation before the answer must end with a user turn")
  prompt = turns[-1][1]
  choices = tuple(sample.choices)
  if choices:
    prompt = with_choices(prompt, choices)
  history = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2))
  full = tuple(sample.turns) if answer is not None else ()
  return Example(
    index, sample.key, history, prompt, tuple(sample.images), Reference(answers, choices), sample.category, full
  )


def read(
  spec: str, options: sources_lib.Options, max_examples: int | None = None
) -> tuple[list[Example], collections.Counter]:
  """The first max_examples usable samples of the one source `spec` names (default: all of it,
  or SHAPES_EXAMPLES of shapes), and the count of samples skipped, by reason."""
  if "," in spec or "=" in spec.rpartition(":")[2]:
    raise UserError(f"data spec {spec!r}: eval reads one source, not a mixture")
  source = sources_lib.open_source(spec, options)
  limit = max_examples or (SHAPES_EXAMPLES if isinstance(source, sources_lib.ShapesSource) else len(source))
  examples, skipped = [], collections.Counter()
  for index in range(len(source)):
    if len(examples) == limit:
      break
    try:
      sample = source[index]
      if sum(text.count(IMAGE) for _, text in sample.turns) != len(sample.images) and any(
        IMAGE in text for _, text in sample.turns
      ):
        raise BadSample(
          "image_count",
          f"id {sample.key}: {len(sample.images)} image(s) but a different number of {IMAGE} placeholders",
        )
      examples.append(from_sample(sample, index))
    except BadSample as e:
      skipped[e.reason] += 1
    except UserError as e:
      raise UserError(f"data spec {spec!r}: {e}") from None
  if not examples:
    raise UserError(f"data spec {spec!r}: no usable samples" + (f" ({dict(skipped)} skipped)" if skipped else ""))
  return examples, skipped
