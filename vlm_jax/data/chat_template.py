"""The model's own chat template (`config.data.template = "hf"`): the Jinja template shipped with
a Hugging Face tokenizer, rendered as transformers renders it.

The loss mask still comes from per-turn spans: the conversation is rendered prefix by prefix and
each turn's piece is the text its render adds, encoded on its own; assistant pieces (answer and
end-of-turn markup) are supervised, everything else is not.
"""

import datetime
import functools
import json
from typing import Sequence

import numpy as np

from vlm_jax.data import IMAGE
from vlm_jax.data.tokenizer import bos_prefix
from vlm_jax.errors import UserError

HF = "hf"


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  try:
    import jinja2
    import jinja2.ext  # not loaded by `import jinja2` alone
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError:
    raise UserError("the model's chat template needs jinja2: pip install 'vlm-jax[convert]'") from None

  def raise_exception(message):
    raise UserError(f"chat template: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  class Generation(jinja2.ext.Extension):
    """transformers' {% generation %} ... {% endgeneration %} (marks assistant text): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  # The settings transformers' apply_chat_template uses, so the text is the same.
  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
  )
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise UserError(f"chat template does not compile: {e}") from None


def _content(text: str, parts: bool):
  """A message's content: the text, or (for templates that iterate typed parts, as LLaVA
  processors' do) a list of {"type": "image"} and {"type": "text"} parts."""
  if not parts:
    return text
  out = []
  for i, piece in enumerate(text.split(IMAGE)):
    if i:
      out.append({"type": "image"})
    if piece.strip():
      out.append({"type": "text", "text": piece.strip()})
  return out


def render(tokenizer, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
  """Text of a conversation under the tokenizer's template; <image> markers kept in place."""
  if not getattr(tokenizer, "chat_template", None):
    raise UserError(f"tokenizer {tokenizer.name}: no chat template (config.data.template='hf' needs one)")
  template = _compile(tokenizer.chat_template)
  wanted = sum(t.count(IMAGE) for _, t in turns)
  for parts in (False, True):
    messages = [{"role": role, "content": _content(text, parts)} for role, text in turns]
    try:
      text = template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=getattr(tokenizer, "bos_token", None) or "",
        eos_token=getattr(tokenizer, "eos_token", None) or "",
      )
    except UserError:
      raise
    except Exception as e:  # a template written for the other content form
      if parts:
        raise UserError(f"chat template of {tokenizer.name} fails: {type(e).__name__}: {e}") from None
      continue
    if text.count(IMAGE) == wanted:
      return text
  raise UserError(f"chat template of {tokenizer.name} does not place the {IMAGE} marker; use --raw-prompt")


def _with_bos(tokenizer, text: str, ids: list[int]) -> list[int]:
  """As transformers' processor.apply_chat_template tokenizes a rendered prompt: with the BOS the
  tokenizer adds (Llama's, none for Qwen2), unless the template already wrote it ({{ bos_token }})."""
  bos_token = getattr(tokenizer, "bos_token", None)
  if bos_token and text.startswith(bos_token):
    return ids
  return bos_prefix(tokenizer) + ids


def encode_prompt(turns: Sequence[tuple[str, str]], tokenizer, text_ids) -> np.ndarray:
  """A conversation ending with a user turn, rendered whole and tokenized once (as
  processor.apply_chat_template), ending where the assistant's answer starts."""
  text = render(tokenizer, turns, add_generation_prompt=True)
  return np.asarray(_with_bos(tokenizer, text, text_ids(text)), np.int32)


def encode_conversation(turns: Sequence[tuple[str, str]], tokenizer, text_ids):
  """-> (tokens, loss_mask) with per-turn spans from prefix renders."""
  tokens, mask, done = [], [], ""
  for k, (role, _) in enumerate(turns):
    upto = render(tokenizer, turns[: k + 1], add_generation_prompt=role == "user")
    if not upto.startswith(done):
      raise UserError(
        f"chat template of {tokenizer.name}: the render of turn {k} does not extend the "
        "render before it, so turns cannot be given their own loss mask"
      )
    ids = text_ids(upto[len(done) :])
    tokens += ids
    mask += [role == "assistant"] * len(ids)
    done = upto
  ids = _with_bos(tokenizer, done, [])
  return np.asarray(ids + tokens, np.int32), np.asarray([False] * len(ids) + mask, np.bool_)
