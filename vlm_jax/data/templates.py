"""Chat templates: a conversation -> tokens and a loss mask built from per-turn spans.

A conversation is rendered as alternating runs of unsupervised text (BOS, system, user turns and
the assistant header) and supervised text (each answer with its end-of-turn marker). Each run is
encoded on its own and its mask set as it is appended, so the mask cannot drift from the tokens
when a template changes (LLaVA's "tokenization mismatch" re-tokenized and subtracted lengths).
Runs split only where supervision changes, and a supervised run starts with its own leading
space (" red"), the way sentencepiece and byte-level BPE attach a space to the word after it, so
the runs concatenate to the tokens of the whole text.
"""

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from vlm_jax.config import check_image_position
from vlm_jax.data import IMAGE, chat_template
from vlm_jax.data.tokenizer import Tokenizer, bos_prefix
from vlm_jax.errors import BadSample, UserError

ROLES = ("user", "assistant")
TEXT = "{}"  # where a turn's text goes in a template string (not str.format: texts hold braces)


@dataclasses.dataclass(frozen=True)
class Template:
  """[BOS] system, then per round `user` (unsupervised, ends with the assistant header), `answer`
  (supervised) [+ EOS id, supervised] and `after_answer` (unsupervised)."""

  user: str
  answer: str
  eos: bool = False  # the tokenizer's EOS id ends each answer
  # BOS: "tokenizer" if the tokenizer adds one (tokenizer.bos_prefix, as LLaVA tokenizes), "template"
  # if the model's own Jinja template writes {{ bos_token }} (Llama 3, Gemma), "none".
  bos: str = "tokenizer"
  system: str = ""
  after_answer: str = ""
  trim: bool = False  # strip each turn's text (Jinja's `| trim` in Llama 3 and Gemma)
  captions: bool = False  # stage-1 captions: one round, the user text is reduced to its images


VICUNA_SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the user's questions. "
)

TEMPLATES = {
  # Vicuna-like without a system prompt: "USER: <q> ASSISTANT: <a></s>USER: ..."
  "simple": Template(user="USER: {} ASSISTANT:", answer=" {}", eos=True),
  # LLaVA stage 1: "<image>caption\n"; only the caption and its newline are supervised.
  "plain": Template(user=TEXT, answer="{}\n", captions=True),
  # LLaVA-1.5: "SYS USER: <image>\nQ ASSISTANT: A</s>USER: ..."
  "vicuna_v1": Template(system=VICUNA_SYSTEM, user="USER: {} ASSISTANT:", answer=" {}", eos=True),
  # Meta Llama 3 Instruct; the header is not supervised, the answer and <|eot_id|> are.
  "llama3": Template(
    user="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    answer="{}<|eot_id|>",
    trim=True,
    bos="template",
  ),
  # Qwen2 (ChatML) with its default system message; no BOS.
  "chatml": Template(
    system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    answer="{}<|im_end|>",
    after_answer="\n",
    bos="none",
  ),
  "gemma": Template(
    user="<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n",
    answer="{}<end_of_turn>",
    after_answer="\n",
    trim=True,
    bos="template",
  ),
}


# A template's special tokens: <|im_end|>, <|eot_id|>, <start_of_turn>, ...
_SPECIAL = re.compile(r"<\|[^<>|]+\|>|<[a-z_]+_of_turn>")


def check_tokenizer(name: str, tokenizer: Tokenizer) -> None:
  """config.data.template `name` can be written with the tokenizer: the model's own template
  exists, and each special token a built-in template writes is one token of this vocabulary."""
  tpl = get_template(name)
  if tpl is None:
    if not getattr(tokenizer, "chat_template", None):
      raise UserError(
        f"config.data.template: 'hf' needs the tokenizer's own chat template, and "
        f"{tokenizer.name} has none; name a built-in one ({', '.join(TEMPLATES)})"
      )
    return
  texts = (tpl.user, tpl.answer, tpl.system, tpl.after_answer)
  for token in sorted({t for text in texts for t in _SPECIAL.findall(text)}):
    if len(tokenizer.encode(token)) != 1:
      raise UserError(
        f"config.data.template: {name!r} writes {token}, which is not a token of "
        f"{tokenizer.name}; use its model's template ('hf' or another)"
      )


@dataclasses.dataclass(frozen=True)
class Encoded:
  """tokens int32 [n]; loss_mask bool [n], True where the token is a supervised target."""

  tokens: np.ndarray
  loss_mask: np.ndarray


def get_template(name: str) -> Template | None:
  """None for "hf": the tokenizer's own Jinja template (data/chat_template.py)."""
  if name == chat_template.HF:
    return None
  if name not in TEMPLATES:
    raise UserError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)}, {chat_template.HF})")
  return TEMPLATES[name]


def _bos(tokenizer: Tokenizer, tpl: Template | None = None) -> list[int]:
  """The sequence's BOS: as the template says, or (raw text, tpl None) as the tokenizer adds it."""
  if tpl is not None and tpl.bos != "tokenizer":
    return [tokenizer.bos_id] if tpl.bos == "template" and tokenizer.bos_id is not None else []
  return bos_prefix(tokenizer)


def _check_images(texts: Sequence[str], image_tokens: int | Sequence[int], at_most: int | None = None) -> None:
  """<image> only where the model has image tokens to put there (and at most `at_most`)."""
  count = sum(t.count(IMAGE) for t in texts)
  if at_most is not None and count > at_most:
    raise BadSample("image_count", f"{count} {IMAGE} placeholders; at most {at_most} supported here")
  if not isinstance(image_tokens, int):
    if count != len(image_tokens):
      raise BadSample("image_count", f"{count} {IMAGE} placeholders for {len(image_tokens)} images")
  elif count and image_tokens <= 0:
    raise BadSample("image_count", f"{IMAGE} placeholder but the model takes no image tokens (image_tokens=0)")


def _per_image(image_tokens: int | Sequence[int]) -> Callable[[], int]:
  """The placeholder count of each next <image>: one count for all, or (AnyRes) one per image."""
  if isinstance(image_tokens, int):
    return lambda: image_tokens
  counts = iter(image_tokens)
  return lambda: next(counts)


def _text_ids(text: str, tokenizer: Tokenizer, next_count: Callable[[], int]) -> list[int]:
  """Encodes text, expanding each <image> into next_count() placeholder ids."""
  out = []
  for i in tokenizer.encode(text):
    out.extend([i] * next_count() if i == tokenizer.image_id else [i])
  return out


def _check_turns(turns: Sequence[tuple[str, str]], open_end: bool = False) -> None:
  """Alternating user/assistant turns with text; a training conversation ends with an answer,
  a generation prompt (open_end) with a user turn."""
  if not turns:
    raise BadSample("empty", "empty conversation")
  for i, turn in enumerate(turns):
    if len(turn) != 2 or not isinstance(turn[1], str):
      raise BadSample("format", f"turn {i}: expected (role, text), got {turn!r:.60}")
    role, text = turn
    if role not in ROLES:
      raise BadSample("role", f"turn {i}: unknown role {role!r} (expected 'user' or 'assistant')")
    if role != ROLES[i % 2]:
      raise BadSample(
        "role", f"turn {i}: expected a {ROLES[i % 2]!r} turn, got {role!r} (turns alternate, starting with 'user')"
      )
    if not text.strip():
      raise BadSample("empty", f"turn {i}: empty {role} text")
    if role == "assistant" and IMAGE in text:
      raise BadSample("image_count", f"turn {i}: {IMAGE} in an assistant turn")
  if len(turns) % 2 != open_end:
    raise BadSample(
      "role",
      f"turn {len(turns) - 1}: conversation ends with "
      + ("an assistant turn (nothing to answer)" if open_end else "a user turn (nothing to learn)"),
    )


def _caption_turns(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """plain: one round whose user text becomes its <image> markers alone (the prompt is dropped)."""
  if len(turns) != 2:
    raise BadSample("format", f"the plain (caption) template takes one round, got {len(turns) // 2}")
  images = turns[0][1].count(IMAGE)
  if not images:
    raise BadSample("image_count", f"the plain (caption) template needs an {IMAGE} in the user turn")
  return [("user", IMAGE * images), turns[1]]


def _fill(fmt: str, text: str, tpl: Template) -> str:
  return fmt.replace(TEXT, text.strip() if tpl.trim else text)


def encode_conversation(
  turns: Sequence[tuple[str, str]], tokenizer: Tokenizer, image_tokens: int | Sequence[int], template: str = "simple"
) -> Encoded:
  """[BOS] + rounds; the answers and their end-of-turn markers are supervised, nothing else is.

  image_tokens: placeholders per <image>, or a count for each image in order (AnyRes).

  A conversation the template cannot take raises BadSample (a UserError) naming the turn.
  """
  tpl = get_template(template)
  _check_turns(turns)
  _check_images([text for _, text in turns], image_tokens)
  next_count = _per_image(image_tokens)
  if tpl is None:
    return Encoded(
      *chat_template.encode_conversation(turns, tokenizer, lambda text: _text_ids(text, tokenizer, next_count))
    )
  if tpl.captions:
    turns = _caption_turns(turns)
  return _encode_rounds(turns, tpl, tokenizer, next_count)


def _encode_rounds(
  turns: Sequence[tuple[str, str]], tpl: Template, tokenizer: Tokenizer, next_count: Callable[[], int]
) -> Encoded:
  """A built-in template's runs; a conversation ending with a user turn ends with the assistant
  header (a generation prompt)."""
  tokens = _bos(tokenizer, tpl)
  mask = [False] * len(tokens)

  def add(text: str, supervised: bool) -> None:
    ids = _text_ids(text, tokenizer, next_count)
    tokens.extend(ids)
    mask.extend([supervised] * len(ids))

  unsupervised = tpl.system
  for i in range(0, len(turns), 2):
    add(unsupervised + _fill(tpl.user, turns[i][1], tpl), False)
    if i + 1 == len(turns):
      return Encoded(np.asarray(tokens, np.int32), np.asarray(mask, np.bool_))
    add(_fill(tpl.answer, turns[i + 1][1], tpl), True)
    if tpl.eos:
      tokens.append(tokenizer.eos_id)
      mask.append(True)
    unsupervised = tpl.after_answer
  if unsupervised:
    add(unsupervised, False)
  return Encoded(np.asarray(tokens, np.int32), np.asarray(mask, np.bool_))


def place_image(text: str, position: str = "before", count: int = 1) -> str:
  """Adds `count` <image> markers, each on its own line, before (LLaVA's default) or after the text."""
  check_image_position(position)
  markers = "\n".join([IMAGE] * count)
  return f"{markers}\n{text}" if position == "before" else f"{text}\n{markers}"


def encode_prompt(
  prompt: str,
  tokenizer: Tokenizer,
  image_tokens: int | Sequence[int],
  template: str = "simple",
  raw: bool = False,
  image_position: str = "before",
  history: Sequence[tuple[str, str]] = (),
) -> np.ndarray:
  """Generation input: [BOS] + earlier rounds (history: (user, answer) pairs, encoded as in
  training) + the user turn `prompt`, ending with the assistant header.

  image_tokens: placeholders of the one image, or a count for each image in order (AnyRes,
  several images). Without `raw`, a conversation with no <image> gets one marker per image in
  front of its first user text (the LLaVA convention). With `raw`, the text is tokenized as written.
  """
  tpl = get_template(template)
  images = int(image_tokens > 0) if isinstance(image_tokens, int) else len(image_tokens)
  at_most = 1 if isinstance(image_tokens, int) else None
  next_count = _per_image(image_tokens)
  if raw:
    if history:
      raise UserError("a raw prompt is the whole text: it takes no history")
    _check_images([prompt], image_tokens, at_most)
    return np.asarray(_bos(tokenizer) + _text_ids(prompt, tokenizer, next_count), np.int32)
  turns = [turn for user, answer in history for turn in (("user", user), ("assistant", answer))]
  turns.append(("user", prompt))
  if images and not any(IMAGE in text for _, text in turns):
    turns[0] = ("user", place_image(turns[0][1], image_position, images))
  _check_turns(turns, open_end=True)
  _check_images([text for _, text in turns], image_tokens, at_most)
  if tpl is None:
    return chat_template.encode_prompt(turns, tokenizer, lambda text: _text_ids(text, tokenizer, next_count))
  if tpl.captions:
    if history:
      raise UserError("the plain (caption) template takes one round: no history")
    turns = [("user", IMAGE * turns[0][1].count(IMAGE))]
  return _encode_rounds(turns, tpl, tokenizer, next_count).tokens
