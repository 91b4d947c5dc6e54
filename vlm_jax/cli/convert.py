"""`vlm-jax convert`: a Hugging Face directory to a vlm-jax workdir, or a checkpoint back; see
convert.dispatch.import_hf and export."""

import sys

from vlm_jax.cli import common
from vlm_jax.errors import UserError


def run(argv: list[str]) -> int:
  argv, overrides = common.split_overrides(argv)
  p = common.Parser(prog="vlm-jax convert")
  p.add_argument(
    "--from-hf",
    metavar="HF_DIR",
    help="a LlavaForConditionalGeneration or CLIPModel/SiglipModel "
    "(a contrastive model) directory (or, with --vision, an LLM directory) to convert to a vlm-jax "
    "checkpoint",
  )
  p.add_argument("--out", metavar="DIR", help="the vlm-jax workdir to write (with --from-hf)")
  p.add_argument(
    "--vision",
    metavar="VISION_DIR",
    help="a CLIP/SigLIP directory: assemble a fresh VLM from "
    "it and the LLM of --from-hf, with a random bridge (stage 1)",
  )
  p.add_argument(
    "--qformer",
    metavar="BLIP2_DIR",
    help="with --vision: a Blip2ForConditionalGeneration "
    "directory whose Q-Former (and projection, if its LLM is as wide) is the bridge",
  )
  p.add_argument(
    "--feature-layer", type=int, default=-2, help="with --vision: the vision hidden state the bridge reads (LLaVA: -2)"
  )
  p.add_argument(
    "--config",
    help="with --from-hf: CONFIG.py[:ARG] whose non-model fields the written "
    "workdir gets (training settings); model fields come from the HF config",
  )
  p.add_argument("--checkpoint", metavar="PATH", help="a vlm-jax workdir or step directory to export")
  p.add_argument("--to-hf", metavar="HF_DIR", help="the Hugging Face directory to write (with --checkpoint)")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16", "float16"),
    help="with --to-hf: tensor dtype (default: each tensor's dtype at import, else float32)",
  )
  p.add_argument("--max-shard-gb", type=float, default=4.0, help="with --to-hf: size of each safetensors shard")
  lora_mode = p.add_mutually_exclusive_group()
  lora_mode.add_argument(
    "--merge-lora",
    action="store_true",
    help="with --to-hf, a LoRA checkpoint: one model with the adapters merged into its weights",
  )
  lora_mode.add_argument(
    "--peft",
    action="store_true",
    help="with --to-hf, a LoRA checkpoint: a PEFT adapter "
    "for the Hugging Face checkpoint the run started from (model.init_from), what it trained "
    "whole as modules_to_save; else the base model plus the adapter in HF_DIR/adapter",
  )
  args = p.parse_args(argv)
  importing, exporting = bool(args.from_hf or args.out), bool(args.checkpoint or args.to_hf)
  if importing == exporting:
    raise UserError("convert: give either --from-hf HF_DIR --out DIR or --checkpoint PATH --to-hf HF_DIR")
  if importing:
    if not (args.from_hf and args.out):
      raise UserError(f"convert: {'--out' if args.from_hf else '--from-hf'} is missing")
    base = common.load_config(args.config, overrides, complete=False)
    from vlm_jax.convert import dispatch

    out = dispatch.import_hf(
      args.from_hf, args.out, vision=args.vision, qformer=args.qformer, feature_layer=args.feature_layer, base=base
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
  if not (args.checkpoint and args.to_hf):
    raise UserError(f"convert: {'--to-hf' if args.checkpoint else '--checkpoint'} is missing")
  from vlm_jax.convert import dispatch

  dispatch.export(
    args.checkpoint,
    args.to_hf,
    dtype=args.dtype,
    max_shard_bytes=int(args.max_shard_gb * 2**30),
    merge_lora=args.merge_lora,
    peft=args.peft,
  )
  print(f"wrote {args.to_hf}", file=sys.stderr)
  return 0
