"""`vlm-jax chat`: a conversation with a checkpoint in the terminal; see vlm_jax.chat."""

import sys

from vlm_jax.cli import common


def run(argv: list[str]) -> int:
  p = common.Parser(prog="vlm-jax chat")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--image", action="append", default=[], help="attached to the first message")
  common.sampling_flags(p)
  args = p.parse_args(argv)
  sampling = common.sampling(args)
  from vlm_jax import chat
  from vlm_jax.data.images import load_image

  images = [load_image(path) for path in args.image]
  import vlm_jax

  session = chat.Chat(vlm_jax.load(args.checkpoint), max_new_tokens=args.max_new_tokens or 256, **sampling)
  session.pending.extend(images)
  return session.run(input, sys.stdout)
