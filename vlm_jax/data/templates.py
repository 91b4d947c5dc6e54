"""Chat templates: a conversation -> tokens and a loss mask built from per-piece spans.

Each piece (header, user text, answer, EOS) is encoded on its own and concatenated, and the
loss mask is set piece by piece, so the mask cannot drift from the tokens when a template
changes. A space between pieces is glued to the front of the following piece: sentencepiece
attaches a space to the word after it, so the pieces concatenate to exactly the tokens of the
whole text.
"""

import dataclasses
from typing import Sequence

import numpy as np

from vlm_jax.data import chat_template
from vlm_jax.errors import UserError
from vlm_jax.data.tokenizer import IMAGE, Tokenizer

ROLES = ("user", "assistant")


@dataclasses.dataclass(frozen=True)
class Template:
  """Text around each round: user_header, sep + user text, assistant_header, sep + answer, EOS."""
  user_header: str
  assistant_header: str
  sep: str


# Vicuna-like: "USER: <q> ASSISTANT: <a></s>USER: ..."
TEMPLATES = {"simple": Template(user_header="USER:", assistant_header=" ASSISTANT:", sep=" ")}


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


def _bos(tokenizer: Tokenizer) -> list[int]:
  return [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # Qwen2 has no BOS


def _check_images(texts: Sequence[str], image_tokens: int) -> None:
  """At most one <image> per sample, and only where the model has image tokens to put there."""
  count = sum(t.count(IMAGE) for t in texts)
  if count > 1:
    raise UserError(f"{count} {IMAGE} placeholders in one sample; at most 1 is supported")
  if count and image_tokens <= 0:
    raise UserError(f"{IMAGE} placeholder but the model takes no image tokens (image_tokens=0)")


def _text_ids(text: str, tokenizer: Tokenizer, image_tokens: int) -> list[int]:
  """Encodes text, expanding each <image> into `image_tokens` placeholder ids."""
  out = []
  for i in tokenizer.encode(text):
    out.extend([i] * image_tokens if i == tokenizer.image_id else [i])
  return out


def _user_ids(tpl: Template, text: str, tokenizer: Tokenizer, image_tokens: int) -> list[int]:
  """One user turn up to and including the assistant header (where generation starts)."""
  return (tokenizer.encode(tpl.user_header) + _text_ids(tpl.sep + text, tokenizer, image_tokens)
          + tokenizer.encode(tpl.assistant_header))


def _check_turns(turns: Sequence[tuple[str, str]]) -> None:
  if not turns:
    raise UserError("empty conversation")
  for i, turn in enumerate(turns):
    if len(turn) != 2 or not isinstance(turn[1], str):
      raise UserError(f"turn {i}: expected (role, text), got {turn!r:.60}")
    role, text = turn
    if role not in ROLES:
      raise UserError(f"turn {i}: unknown role {role!r} (expected 'user' or 'assistant')")
    if role != ROLES[i % 2]:
      raise UserError(f"turn {i}: expected a {ROLES[i % 2]!r} turn, got {role!r} "
                      "(turns alternate, starting with 'user')")
    if not text.strip():
      raise UserError(f"turn {i}: empty {role} text")
    if role == "assistant" and IMAGE in text:
      raise UserError(f"turn {i}: {IMAGE} in an assistant turn")
  if len(turns) % 2:
    raise UserError(f"turn {len(turns) - 1}: conversation ends with a user turn (nothing to learn)")


def encode_conversation(turns: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                        image_tokens: int, template: str = "simple") -> Encoded:
  """BOS + rounds; the answers and their EOS are supervised, nothing else is."""
  tpl = get_template(template)
  _check_turns(turns)
  _check_images([text for _, text in turns], image_tokens)
  if tpl is None:
    return Encoded(*chat_template.encode_conversation(
        turns, tokenizer, lambda text: _text_ids(text, tokenizer, image_tokens)))
  tokens = _bos(tokenizer)
  mask = [False] * len(tokens)
  for (_, user), (_, answer) in zip(turns[0::2], turns[1::2]):
    ids = _user_ids(tpl, user, tokenizer, image_tokens)
    tokens += ids
    mask += [False] * len(ids)
    ids = tokenizer.encode(tpl.sep + answer) + [tokenizer.eos_id]
    tokens += ids
    mask += [True] * len(ids)
  return Encoded(np.asarray(tokens, np.int32), np.asarray(mask, np.bool_))


IMAGE_POSITIONS = ("before", "after")


def place_image(text: str, position: str = "before") -> str:
  """Adds the <image> marker on its own line before (LLaVA's default) or after the text."""
  if position not in IMAGE_POSITIONS:
    raise UserError(f"config.data.image_position: {position!r} is not before or after")
  return f"{IMAGE}\n{text}" if position == "before" else f"{text}\n{IMAGE}"


def encode_prompt(prompt: str, tokenizer: Tokenizer, image_tokens: int,
                  template: str = "simple", raw: bool = False,
                  image_position: str = "before") -> np.ndarray:
  """Generation input: BOS + the first user turn ending with the assistant header.

  Without `raw`, a prompt with no <image> gets "<image>\\n" in front when the model takes
  image tokens (the LLaVA convention). With `raw`, the text is tokenized as written.
  """
  tpl = get_template(template)
  _check_images([prompt], image_tokens)
  if raw:
    ids = _text_ids(prompt, tokenizer, image_tokens)
  else:
    if IMAGE not in prompt and image_tokens > 0:
      prompt = place_image(prompt, image_position)
    if tpl is None:
      return chat_template.encode_prompt(prompt, tokenizer,
                                         lambda text: _text_ids(text, tokenizer, image_tokens))
    ids = _user_ids(tpl, prompt, tokenizer, image_tokens)
  return np.asarray(_bos(tokenizer) + ids, np.int32)
