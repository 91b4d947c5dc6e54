"""The tokenizer of a Hugging Face model directory, with the interface of data.tokenizer.Tokenizer.

tokenizer.json (the `tokenizers` library) is preferred; else tokenizer.model (sentencepiece)
plus the added tokens transformers keeps beside it (added_tokens.json, tokenizer_config.json).
Special tokens come from tokenizer_config.json / special_tokens_map.json, falling back to the
ids in config.json; the chat template from chat_template.json (the processor's, which knows
about images), chat_template.jinja or tokenizer_config.json.
"""

import json
import os
import re

from vlm_jax.data import IMAGE
from vlm_jax.errors import UserError
from vlm_jax.files import read_json

FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.json",
  "chat_template.jinja",
)


def _read(directory: str, name: str) -> dict | None:
  return read_json(directory, name, required=False)


def _content(token) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  return token.get("content") if isinstance(token, dict) else token


class _TokenizersBackend:
  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError:
      raise UserError("tokenizer.json needs the tokenizers package: pip install 'vlm-jax[convert]'") from None
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises its own exception type
      raise UserError(f"cannot read tokenizer {path}: {e}") from None

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self.tok.token_to_id(token)

  def id_to_token(self, i: int) -> str:
    return self.tok.id_to_token(i)

  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def adds_bos(self, bos_id: int | None, tokenizer_config: dict) -> bool:
    """Whether encoding with special tokens puts BOS first (the post-processor's choice)."""
    ids = self.tok.encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id

  def add(self, token: str) -> int:
    import tokenizers

    self.tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
    return self.tok.token_to_id(token)

  def save(self, directory: str) -> None:
    self.tok.save(os.path.join(directory, "tokenizer.json"))


class _SentencePieceBackend:
  """A sentencepiece model plus added tokens (matched in text first, as transformers does)."""

  def __init__(self, path: str, added: dict[str, int]):
    import sentencepiece as spm

    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      raise UserError(f"cannot read tokenizer {path}: {reason}") from None
    self.added = dict(added)  # matched in text even when sentencepiece knows the piece ("<s>")
    self._by_id = {i: t for t, i in self.added.items()}
    self._split = (
      re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")
      if self.added
      else None
    )

  def encode(self, text: str) -> list[int]:
    if self._split is None:
      return self.sp.encode(text)
    out = []
    for part in self._split.split(text):
      if part in self.added:
        out.append(self.added[part])
      elif part:
        out.extend(self.sp.encode(part))
    return out

  def decode(self, ids: list[int]) -> str:
    text, run = [], []
    for i in ids:
      if i in self._by_id:
        text.append(self.sp.decode(run))
        text.append(self._by_id[i])
        run = []
      else:
        run.append(i)
    return "".join(text + [self.sp.decode(run)])

  def token_to_id(self, token: str) -> int | None:
    if token in self.added:
      return self.added[token]
    i = self.sp.piece_to_id(token)
    return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

  def id_to_token(self, i: int) -> str:
    return self._by_id.get(i) or self.sp.id_to_piece(i)

  def vocab_size(self) -> int:
    return max([self.sp.vocab_size()] + [i + 1 for i in self.added.values()])

  def adds_bos(self, bos_id: int | None, tokenizer_config: dict) -> bool:
    # transformers (5.x) converts the .model with a post-processor that adds BOS only when asked.
    return bos_id is not None and bool(tokenizer_config.get("add_bos_token", False))

  def add(self, token: str) -> int:
    self.added[token] = i = self.vocab_size()
    self._by_id[i] = token
    self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")
    return i

  def save(self, directory: str) -> None:
    with open(os.path.join(directory, "added_tokens.json"), "w") as f:
      json.dump(self.added, f, indent=2)


class HFTokenizer:
  """encode/decode/vocab_size/pad_id/bos_id/eos_id/image_id like Tokenizer; bos_id may be None
  (Qwen2 has no BOS). `chat_template` is the model's Jinja template, or None; `adds_bos`: whether
  transformers' tokenizer puts BOS in front of text it encodes with special tokens (as LLaVA
  processors do with a rendered prompt that does not start with it)."""

  def __init__(
    self,
    backend,
    name: str,
    *,
    bos: str | None,
    eos: str | None,
    pad: str | None,
    chat_template: str | None,
    add_image: bool = False,
    tokenizer_config: dict | None = None,
  ):
    self._b, self.name, self.chat_template = backend, name, chat_template
    self.bos_token, self.eos_token = bos, eos
    image_id = backend.token_to_id(IMAGE)
    if image_id is None:
      if not add_image:
        raise UserError(
          f"tokenizer {name}: no {IMAGE} token (a LLaVA tokenizer has one; an LLM's "
          "gets one when assembled with `vlm-jax convert --vision`)"
        )
      image_id = backend.add(IMAGE)
    self._image_id = image_id
    self._bos_id = backend.token_to_id(bos) if bos else None
    self._eos_id = backend.token_to_id(eos) if eos else None
    if self._eos_id is None:
      raise UserError(f"tokenizer {name}: no EOS token (eos_token in tokenizer_config.json)")
    pad_id = backend.token_to_id(pad) if pad else None
    self._pad_id = self._eos_id if pad_id is None else pad_id  # padding is masked: EOS will do
    self._drop = {self._pad_id, self._bos_id, self._eos_id, self._image_id} - {None}
    self.adds_bos = backend.adds_bos(self._bos_id, tokenizer_config or {})

  @property
  def vocab_size(self) -> int:
    return self._b.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def image_id(self) -> int:
    return self._image_id

  def encode(self, text: str) -> list[int]:
    return self._b.encode(text)

  def decode(self, ids) -> str:
    return self._b.decode([int(i) for i in ids if int(i) not in self._drop])

  def id_to_piece(self, i: int) -> str:
    return self._b.id_to_token(int(i))

  def save(self, directory: str) -> None:
    """Writes the backend's files as modified (an added <image>); the rest is copied by the caller."""
    self._b.save(directory)


def _chat_template(directory: str, tokenizer_config: dict) -> str | None:
  processor = _read(directory, "chat_template.json")
  if processor and isinstance(processor.get("chat_template"), str):
    return processor["chat_template"]
  path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(path):
    with open(path) as f:
      return f.read()
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default") or next(iter(named.values()), None)
  return template


def _special(directory: str, tokenizer_config: dict, key: str, backend) -> str | None:
  if f"{key}_token" in tokenizer_config:  # null here means none (Qwen2's bos_token)
    return _content(tokenizer_config[f"{key}_token"])
  token = _content((_read(directory, "special_tokens_map.json") or {}).get(f"{key}_token"))
  if token is None:
    for name in ("generation_config.json", "config.json"):
      ids = (_read(directory, name) or {}).get(f"{key}_token_id")
      ids = ids[0] if isinstance(ids, list) and ids else ids
      if isinstance(ids, int) and 0 <= ids < backend.vocab_size():
        return backend.id_to_token(ids)
  return token


def load(path: str, add_image: bool = False) -> HFTokenizer:
  """A HF directory's tokenizer (or a tokenizer.json file with nothing beside it)."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config = _read(directory, "tokenizer_config.json") or {}
  if os.path.isfile(path):
    backend = _TokenizersBackend(path)
  elif os.path.isfile(os.path.join(directory, "tokenizer.json")):
    backend = _TokenizersBackend(os.path.join(directory, "tokenizer.json"))
  elif os.path.isfile(os.path.join(directory, "tokenizer.model")):
    added = dict(_read(directory, "added_tokens.json") or {})
    for i, token in (config.get("added_tokens_decoder") or {}).items():
      added.setdefault(_content(token), int(i))
    backend = _SentencePieceBackend(os.path.join(directory, "tokenizer.model"), added)
  else:
    raise UserError(f"{directory}: no tokenizer.json or tokenizer.model")
  specials = {k: _special(directory, config, k, backend) for k in ("bos", "eos", "pad")}
  return HFTokenizer(
    backend,
    path,
    chat_template=_chat_template(directory, config),
    add_image=add_image,
    tokenizer_config=config,
    **specials,
  )
