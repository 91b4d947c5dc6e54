"""Text as tokens arrive: pieces that join to the whole answer's text."""

from vlm_jax.data.tokenizer import Tokenizer


class TextStream:
  """Turns a growing list of ids into pieces whose concatenation is decode(ids).strip().

  The ids are decoded whole each time (sentencepiece's leading spaces and merged bytes come out
  as in one decode); a piece is given once it ends in whole characters (no U+FFFD from a cut
  multi-byte sequence), and trailing whitespace waits for the text that follows it.
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer, self.ids, self.sent = tokenizer, [], 0

  def push(self, ids: list[int]) -> str:
    self.ids.extend(ids)
    text = self.tokenizer.decode(self.ids).strip()
    if text.endswith("\ufffd"):
      return ""
    piece, self.sent = text[self.sent :], len(text)
    return piece
