"""`vlm-jax generate`: one answer to a prompt about images, streamed, or as JSON with its counts."""

import json
import time

from vlm_jax.cli import common
from vlm_jax.errors import UserError


def run(argv: list[str]) -> int:
  p = common.Parser(prog="vlm-jax generate")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--image", action="append", required=True, help="repeat for several images")
  p.add_argument("--prompt", required=True)
  p.add_argument("--raw-prompt", action="store_true")
  p.add_argument("--json", action="store_true")
  common.sampling_flags(p)
  args = p.parse_args(argv)
  sampling = common.sampling(args)
  max_new = args.max_new_tokens or 32
  from vlm_jax.data.images import load_image

  images = [load_image(path) for path in args.image]  # fail on a bad file before loading the model
  import vlm_jax

  model = vlm_jax.load(args.checkpoint)
  prompt_ids = model.encode_prompt(args.prompt, args.raw_prompt, images)
  if args.raw_prompt and model.image_tokens and model.tokenizer.image_id not in prompt_ids:
    raise UserError("--raw-prompt: the prompt has no <image>; write <image> where the image goes")
  t0 = time.time()
  if args.json:
    ids = model.generate_ids([images], [args.prompt], max_new, args.raw_prompt, **sampling)[0]
    print(
      json.dumps(
        {
          "text": model.tokenizer.decode(ids).strip(),
          "token_ids": ids,
          "prompt_tokens": int(len(prompt_ids)),
          "image_tokens": sum(model.image_tokens_for(im) for im in images),
          "seconds": round(time.time() - t0, 3),
        }
      )
    )
  else:
    for piece in model.stream([images], [args.prompt], max_new, args.raw_prompt, **sampling):
      print(piece, end="", flush=True)
    print()
  return 0
