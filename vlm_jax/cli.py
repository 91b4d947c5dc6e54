"""`vlm-jax` subcommands: parse, build, call. Bad input -> one line on stderr, exit status 2."""

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from vlm_jax.errors import UserError

COMMANDS = ("train", "eval", "generate", "chat", "convert", "tokens", "data", "compile")


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # argparse prints usage + exits 2; we want one line
    raise UserError(f"{self.prog}: {message}")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Pulls `--config.KEY=VALUE` / `--config.KEY VALUE` out of argv."""
  rest, overrides, i = [], {}, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise UserError(f"{arg}: missing value")
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _setup_logging(verbose: bool) -> None:
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                      format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("vlm_jax").setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _maybe_distributed() -> None:
  """Multi-host: each process calls jax.distributed.initialize().

  VLM_JAX_DISTRIBUTED=1 lets jax find its peers (TPU metadata, SLURM, Open MPI); elsewhere
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID say it (jax itself reads only
  the first). CPU devices exchange collectives over gloo.
  """
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address and os.environ.get("VLM_JAX_DISTRIBUTED") != "1":
    return
  import jax
  kwargs = {}
  if address:
    try:
      kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                    process_id=int(os.environ["JAX_PROCESS_ID"]))
    except (KeyError, ValueError) as e:
      raise UserError(f"JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                      f"integers too ({type(e).__name__}: {e})") from None
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no effect on GPU/TPU devices
  jax.distributed.initialize(address, **kwargs)


def _load_config(spec: str, overrides: dict[str, str]):
  """CONFIG.py[:ARG] with the --config.KEY=VALUE overrides, what config.model.init_from's checkpoint
  defines taken from it (vlm_jax/convert/init_from.py), validated."""
  from vlm_jax import build
  from vlm_jax import config as config_lib
  from vlm_jax.convert import init_from
  config = config_lib.load_file(spec)
  config_lib.apply_overrides(config, overrides)
  init_from.take_from_checkpoint(config, overrides)
  build.validate(config)
  return config


def cmd_train(argv: list[str]) -> int:
  argv, overrides = split_overrides(argv)
  p = _Parser(prog="vlm-jax train")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="training data spec (replaces config.data.sources)")
  p.add_argument("--eval-data", help="eval data spec (replaces config.evals with this one, metric auto)")
  args = p.parse_args(argv)
  config = _load_config(args.config, overrides)
  from vlm_jax import config as config_lib
  if args.data:
    config.data.sources = args.data
  if args.eval_data:
    config.evals = {config_lib.eval_name(args.eval_data): config_lib.eval_entry(args.eval_data)}
  _maybe_distributed()
  from vlm_jax import api
  api.train(config, args.workdir, explicit=overrides)
  return 0


def cmd_eval(argv: list[str]) -> int:
  p = _Parser(prog="vlm-jax eval")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--data", required=True, help="data spec: llava:FILE.jsonl[:IMAGE_ROOT], tfds:NAME[:SPLIT], shapes:SPLIT")
  p.add_argument("--metric", default="auto", help="auto | vqa | exact | mc | pope | shapes (auto: from what "
                 "the samples carry) | zeroshot (a contrastive model's, and its auto)")
  p.add_argument("--predictions", metavar="FILE.jsonl", help="write each example's prediction and score")
  p.add_argument("--max-examples", type=int, help="the first N samples (default: all; 512 of shapes)")
  p.add_argument("--batch-size", type=int, help="prompts per batch (default: config.train.eval_batch_size)")
  p.add_argument("--max-new-tokens", type=int, help="answer length (default: the metric's)")
  p.add_argument("--shuffle-images", action="store_true",
                 help="pair each question with another example's image (control: should drop to chance)")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  for flag, value in (("--max-examples", args.max_examples), ("--batch-size", args.batch_size),
                      ("--max-new-tokens", args.max_new_tokens)):
    if value is not None and value < 1:
      raise UserError(f"{flag} must be >= 1, got {value}")
  from vlm_jax.eval import metrics as metrics_lib
  from vlm_jax.eval import zeroshot
  if args.metric != zeroshot.METRIC:
    metrics_lib.check_name(args.metric, "--metric")
  if args.predictions and (os.path.isdir(args.predictions)
                           or not os.path.isdir(os.path.dirname(os.path.abspath(args.predictions)))):
    raise UserError(f"--predictions {args.predictions}: is a directory, or its folder does not exist")
  import vlm_jax
  from vlm_jax.eval.progress import ProgressBar
  from vlm_jax.eval.runner import Evaluator
  model = vlm_jax.load(args.checkpoint)
  if model.config.task == "contrastive" or args.metric == zeroshot.METRIC:
    return _zeroshot_eval(model, args)
  evaluator = Evaluator(model.run, model.tokenizer, args.data, metric=args.metric, max_examples=args.max_examples,
                        batch_size=args.batch_size or 0, max_new_tokens=args.max_new_tokens or 0)
  if args.metric == metrics_lib.AUTO:
    print(f"metric: {evaluator.metric} ({evaluator.metric_reason})", file=sys.stderr)
  result = evaluator(model.params, shuffle_images=args.shuffle_images, progress=ProgressBar("eval"))
  if args.predictions:
    with open(args.predictions, "w", encoding="utf-8") as f:
      for record in result.records:
        f.write(json.dumps(record) + "\n")
  _print_metrics(result.metrics, args.json)
  return 0


def _print_metrics(metrics: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps(metrics))
  else:
    for k, v in metrics.items():
      print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def _zeroshot_eval(model, args) -> int:
  """vlm-jax eval of a contrastive model: zero-shot classification (eval/zeroshot.py)."""
  from vlm_jax.eval import zeroshot
  if model.config.task != "contrastive" or args.metric not in ("auto", zeroshot.METRIC):
    raise UserError(f"--metric {args.metric}: zero-shot classification scores contrastive models, and a "
                    f"contrastive model only that way ({args.checkpoint} holds a {model.config.task} model)")
  for flag in ("predictions", "shuffle_images", "max_new_tokens"):
    if getattr(args, flag):
      raise UserError(f"--{flag.replace('_', '-')}: not for zero-shot classification")
  metrics = zeroshot.ZeroShot(model.run, model.tokenizer, args.data, max_examples=args.max_examples or 512,
                              batch_size=args.batch_size or 0)(model.params)
  _print_metrics(metrics, args.json)
  return 0


def _sampling_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--max-new-tokens", type=int, default=None)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: off")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--min-p", type=float, default=0.0)
  p.add_argument("--repetition-penalty", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)


def _sampling(args) -> dict:
  """The sampling flags, checked before any model loads."""
  from vlm_jax.infer.generate import Sampling
  sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)
  sampling.check(flags=True)
  if args.max_new_tokens is not None and args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
  return dataclasses.asdict(sampling)


def cmd_generate(argv: list[str]) -> int:
  p = _Parser(prog="vlm-jax generate")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--image", action="append", required=True, help="repeat for several images")
  p.add_argument("--prompt", required=True)
  p.add_argument("--raw-prompt", action="store_true")
  p.add_argument("--json", action="store_true")
  _sampling_flags(p)
  args = p.parse_args(argv)
  sampling = _sampling(args)
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
    print(json.dumps({"text": model.tokenizer.decode(ids).strip(), "token_ids": ids,
                      "prompt_tokens": int(len(prompt_ids)),
                      "image_tokens": sum(model.image_tokens_for(im) for im in images),
                      "seconds": round(time.time() - t0, 3)}))
  else:
    for piece in model.stream([images], [args.prompt], max_new, args.raw_prompt, **sampling):
      print(piece, end="", flush=True)
    print()
  return 0


def cmd_chat(argv: list[str]) -> int:
  p = _Parser(prog="vlm-jax chat")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--image", action="append", default=[], help="attached to the first message")
  _sampling_flags(p)
  args = p.parse_args(argv)
  sampling = _sampling(args)
  from vlm_jax import chat
  from vlm_jax.data.images import load_image
  images = [load_image(path) for path in args.image]
  import vlm_jax
  session = chat.Chat(vlm_jax.load(args.checkpoint), max_new_tokens=args.max_new_tokens or 256, **sampling)
  session.pending.extend(images)
  return session.run(input, sys.stdout)


def cmd_convert(argv: list[str]) -> int:
  argv, overrides = split_overrides(argv)
  p = _Parser(prog="vlm-jax convert")
  p.add_argument("--from-hf", metavar="HF_DIR", help="a LlavaForConditionalGeneration or CLIPModel/SiglipModel "
                 "(a contrastive model) directory (or, with --vision, an LLM directory) to convert to a vlm-jax "
                 "checkpoint")
  p.add_argument("--out", metavar="DIR", help="the vlm-jax workdir to write (with --from-hf)")
  p.add_argument("--vision", metavar="VISION_DIR", help="a CLIP/SigLIP directory: assemble a fresh VLM from "
                 "it and the LLM of --from-hf, with a random bridge (stage 1)")
  p.add_argument("--qformer", metavar="BLIP2_DIR", help="with --vision: a Blip2ForConditionalGeneration "
                 "directory whose Q-Former (and projection, if its LLM is as wide) is the bridge")
  p.add_argument("--feature-layer", type=int, default=-2, help="with --vision: the vision hidden state "
                 "the bridge reads (LLaVA: -2)")
  p.add_argument("--config", help="with --from-hf: CONFIG.py[:ARG] whose non-model fields the written "
                 "workdir gets (training settings); model fields come from the HF config")
  p.add_argument("--checkpoint", metavar="PATH", help="a vlm-jax workdir or step directory to export")
  p.add_argument("--to-hf", metavar="HF_DIR", help="the Hugging Face directory to write (with --checkpoint)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                 help="with --to-hf: tensor dtype (default: each tensor's dtype at import, else float32)")
  p.add_argument("--max-shard-gb", type=float, default=4.0, help="with --to-hf: size of each safetensors shard")
  lora_mode = p.add_mutually_exclusive_group()
  lora_mode.add_argument("--merge-lora", action="store_true", help="with --to-hf, a LoRA checkpoint: one model "
                         "with the adapters merged into its weights")
  lora_mode.add_argument("--peft", action="store_true", help="with --to-hf, a LoRA checkpoint: a PEFT adapter "
                         "for the Hugging Face checkpoint the run started from (model.init_from), what it trained "
                         "whole as modules_to_save; else the base model plus the adapter in HF_DIR/adapter")
  args = p.parse_args(argv)
  importing, exporting = bool(args.from_hf or args.out), bool(args.checkpoint or args.to_hf)
  if importing == exporting:
    raise UserError("convert: give either --from-hf HF_DIR --out DIR or --checkpoint PATH --to-hf HF_DIR")
  if importing:
    if not (args.from_hf and args.out):
      raise UserError(f"convert: {'--out' if args.from_hf else '--from-hf'} is missing")
    if args.qformer and not args.vision:
      raise UserError("convert: --qformer needs --vision (the tower whose features the Q-Former reads)")
    from vlm_jax.files import as_path
    for flag, path in (("--from-hf", args.from_hf), ("--vision", args.vision), ("--qformer", args.qformer)):
      if path is not None and not as_path(path).is_dir():
        raise UserError(f"{flag}: no such directory: {path}")
    base = None
    if args.config:
      from vlm_jax import config as config_lib
      base = config_lib.load_file(args.config)
      config_lib.apply_overrides(base, overrides)
    elif overrides:
      raise UserError("--config.KEY=VALUE needs --config")
    from vlm_jax.convert import dispatch, hf_import
    if args.vision:
      out = hf_import.assemble(args.from_hf, args.vision, args.out, feature_layer=args.feature_layer, base=base,
                               qformer_dir=args.qformer)
    else:
      out = dispatch.convert(args.from_hf, args.out, base=base)  # LLaVA, CLIP or SigLIP, by model_type
    print(f"wrote {out}", file=sys.stderr)
    return 0
  if not (args.checkpoint and args.to_hf):
    raise UserError(f"convert: {'--to-hf' if args.checkpoint else '--checkpoint'} is missing")
  from vlm_jax.convert import dispatch, hf_export
  hf_export.check_out(args.to_hf, args.dtype)
  export = dispatch.EXPORTERS.get(dispatch.checkpoint_task(args.checkpoint), _export_vlm)
  export(args.checkpoint, args.to_hf, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
         merge_lora=args.merge_lora, peft=args.peft)
  print(f"wrote {args.to_hf}", file=sys.stderr)
  return 0


def _export_vlm(path: str, out: str, *, dtype: str | None, max_shard_bytes: int, merge_lora: bool,
                peft: bool) -> None:
  """A VLM checkpoint (or LLaVA directory) as a HF LLaVA directory."""
  import vlm_jax
  from vlm_jax.convert import hf_export
  from vlm_jax.convert import hf_import
  model = vlm_jax.load(path)
  config, params, adapters = hf_export.plain_model(model.run, model.params, merge_lora, peft)
  source = model.config.model.init_from
  if adapters and hf_import.is_hf_dir(source):  # an adapter for the checkpoint the run started from
    hf_export.export_adapter(config, params, adapters, source, out, hf_export.trained_whole(model.run))
    return
  hf_export.export(config, model.tokenizer, params, model.origin, out, dtype=dtype,
                   max_shard_bytes=max_shard_bytes, peft=adapters)


def _image_size(text: str) -> tuple[int, int]:
  """"HxW" -> (H, W)."""
  h, x, w = text.lower().partition("x")
  if not (x and h.strip().isdigit() and w.strip().isdigit()):
    raise UserError(f"--image-size {text!r}: expected HxW in pixels, e.g. 600x1000")
  return int(h), int(w)


def cmd_tokens(argv: list[str]) -> int:
  argv, overrides = split_overrides(argv)
  p = _Parser(prog="vlm-jax tokens")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--image-size", required=True, metavar="HxW", help="image height x width in pixels")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  size = _image_size(args.image_size)
  if min(size) < 1:
    raise UserError(f"--image-size {args.image_size!r}: both sides must be >= 1")
  config = _load_config(args.config, overrides)
  from vlm_jax.data import anyres, anyres_batch
  from vlm_jax.models import vit, vlm
  m = config.model
  per_view = vlm.image_tokens(m)  # one tile's, or one view's, in the LLM's sequence
  bridge = f"bridge {m.bridge.kind}: {vlm.visual_tokens(m)} tokens a {'tile' if m.anyres.enabled else 'view'}"
  if m.vision.token_merging:
    unmerged = m.vision.copy_and_resolve_references()
    unmerged.token_merging = 0
    bridge += (f" (ToMe, {m.vision.token_merging} merged a ViT block: {vit.num_output_tokens(unmerged)} -> "
               f"{vit.num_output_tokens(m.vision)})")
  if m.fusion == "cross_attention":
    bridge += ", read by cross-attention; the sequence holds 1 <image> marker an image"
  if config.model.anyres.enabled:
    plan = anyres.plan(size, anyres_batch.spec_from_config(config.model, per_view))
    out = {"height": size[0], "width": size[1], "grid": list(plan.grid), "tiles": plan.tiles,
           "image_tokens": plan.tokens, "tile_tokens": per_view}
    detail = [bridge, f"canvas {plan.canvas[0]}x{plan.canvas[1]}", f"resized {plan.resized[0]}x{plan.resized[1]}",
              f"features {plan.features[0]}x{plan.features[1]} (+1 newline a row)"]
  else:  # one square view, whatever the image
    # tile_tokens: the bridge's tokens of the view (cross-attention reads them; its sequence holds 1)
    out = {"height": size[0], "width": size[1], "grid": [1, 1], "tiles": 1, "image_tokens": per_view,
           "tile_tokens": vlm.visual_tokens(m)}
    detail = [bridge, "AnyRes off: resized to one square view"]
  if args.json:
    print(json.dumps(out))
  else:
    print(f"{size[0]}x{size[1]} (HxW): grid {out['grid'][0]}x{out['grid'][1]}, {out['tiles']} tiles, "
          f"{out['image_tokens']} image tokens; " + ", ".join(detail))
  return 0


def cmd_data(argv: list[str]) -> int:
  argv, overrides = split_overrides(argv)
  p = _Parser(prog="vlm-jax data")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--data", help="data spec (default: the config's data.sources)")
  p.add_argument("--n", type=int, default=3, help="samples to print")
  p.add_argument("--limit", type=int, help="with --json: at most this many samples of each source")
  p.add_argument("--json", action="store_true", help="one pass over the data; one JSON summary on stdout")
  args = p.parse_args(argv)
  config = _load_config(args.config, overrides)
  from vlm_jax.data import report
  from vlm_jax.data.tokenizer import Tokenizer
  from vlm_jax.models.vlm import image_tokens
  tokenizer = Tokenizer.load(config.data.tokenizer)
  items = report.samples(config, tokenizer, image_tokens(config.model), args.data or config.data.sources,
                         limit=args.limit if args.json else None)
  if args.json:
    print(json.dumps(report.pass_totals(items, tokenizer.image_id).to_json()))
  else:
    report.print_samples(items, tokenizer, args.n)
  return 0


def cmd_compile(argv: list[str]) -> int:
  argv, overrides = split_overrides(argv)
  p = _Parser(prog="vlm-jax compile")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
  p.add_argument("--topology", required=True, help="a TPU slice: v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:2x2, ...; "
                 "or gpu:GB, one GPU of GB gigabytes (an estimate from this machine's CPU compiler)")
  p.add_argument("--decode-rows", type=int, default=8,
                 help="also compile generation for this many prompts of data.seq_len tokens (0: the train step only)")
  p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per prompt (with --decode-rows)")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  for flag, value in (("--decode-rows", args.decode_rows), ("--decode-tokens", args.decode_tokens)):
    if value < 0 or (flag == "--decode-tokens" and value < 1):
      raise UserError(f"{flag} must be >= {0 if flag == '--decode-rows' else 1}, got {value}")
  config = _load_config(args.config, overrides)
  import jax
  # The target is libtpu's description of the slice; this machine's own devices are not needed
  # (and on a machine without a TPU, jax would otherwise try to start libtpu's backend).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  from vlm_jax import aot
  generation = (args.decode_rows, args.decode_tokens) if args.decode_rows else None
  if generation and config.model.anyres.enabled:
    print("vlm-jax compile: generation is compiled for one square image a prompt; AnyRes configs get the train "
          "step only", file=sys.stderr)
    generation = None
  try:
    report = aot.compile_run(config, args.topology, generation)
  except aot.DoesNotFit as e:
    if args.json:
      print(json.dumps(e.to_json()))
    raise UserError(f"{args.topology}: does not fit ({e.message}); levers: "
                    + "; ".join(aot.levers_to_fit(config, e.chips))) from None
  print(json.dumps(report.to_json()) if args.json else aot.describe(report))
  if not report.fits:
    raise UserError(f"{args.topology}: needs {report.peak_bytes / aot.GIB:.2f} "
                    f"GiB per chip (train step {report.total_bytes / aot.GIB:.2f}), more than the "
                    f"{report.hbm_bytes / aot.GIB:.2f} GiB HBM of a {report.device_kind}; levers: "
                    + "; ".join(aot.levers_to_fit(config, report.chips)))
  return 0

def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: vlm-jax {{{','.join(COMMANDS)}}} ...  (vlm-jax COMMAND --help for its flags)")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  _setup_logging(verbose=command == "train")
  try:
    handler = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert,
               "tokens": cmd_tokens, "data": cmd_data, "compile": cmd_compile}.get(command)
    if handler is None:
      raise UserError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    return handler(rest)
  except UserError as e:
    print(f"vlm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("vlm-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
