"""`vlm-jax chat`: a multi-turn conversation in the model's chat template, answers streamed."""

from typing import Callable, TextIO

from vlm_jax.api import Model
from vlm_jax.data import IMAGE
from vlm_jax.data.images import load_image
from vlm_jax.data.templates import place_image
from vlm_jax.errors import UserError

HELP = "/image PATH attaches an image to your next message, /reset starts over, /quit ends"


class Chat:
  """One conversation: earlier (user, answer) rounds, their images, and images waiting for the
  next message (which gets their <image> markers unless it places them itself)."""

  def __init__(self, model: Model, max_new_tokens: int = 256, **sampling):
    self.model, self.max_new_tokens, self.sampling = model, max_new_tokens, sampling
    self.reset()

  def reset(self) -> None:
    self.history: list[tuple[str, str]] = []
    self.images: list = []
    self.pending: list = []

  def say(self, text: str):
    """Yields the answer's text pieces; the round joins the history once it is complete."""
    if self.pending and IMAGE not in text:
      text = place_image(text, self.model.config.data.image_position, len(self.pending))
    images = self.images + self.pending
    pieces = []
    for piece in self.model.stream(
      [images or None], [text], self.max_new_tokens, history=self.history, **self.sampling
    ):
      pieces.append(piece)
      yield piece
    self.history.append((text, "".join(pieces)))
    self.images, self.pending = images, []

  def run(self, read: Callable[[str], str], out: TextIO) -> int:
    """The terminal loop: read lines until /quit or end of input; a bad command or image is said
    in one line and the conversation goes on."""
    print(f"vlm-jax chat: {HELP}", file=out)
    while True:
      try:
        line = read("you> ").strip()
      except EOFError:
        print(file=out)
        return 0
      try:
        if not line:
          continue
        if line in ("/quit", "/exit"):
          return 0
        if line == "/reset":
          self.reset()
          print("(new conversation)", file=out)
        elif line.split()[0] == "/image":
          path = line[len("/image") :].strip()
          if not path:
            raise UserError("/image: give the image's path")
          self.pending.append(load_image(path))
          print(f"(image {path} attached to your next message)", file=out)
        elif line.startswith("/"):
          raise UserError(f"unknown command {line.split()[0]}; {HELP}")
        else:
          print("assistant> ", end="", file=out, flush=True)
          for piece in self.say(line):
            print(piece, end="", file=out, flush=True)
          print(file=out)
      except UserError as e:
        print(f"error: {e}", file=out)
