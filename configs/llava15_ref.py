"""LLaVA-1.5 recipe: CLIP ViT-L/14-336 (hidden_states[-2]), mlp2x_gelu, a Vicuna-7B-sized Llama.

`get_config("stage1")`: the bridge alone on captions (`plain` template, lr 1e-3, batch 256), images
resized by the short side and centre-cropped, as CLIPImageProcessor does. `get_config("stage2")`
(the default): bridge + LLM on conversations (`vicuna_v1`, lr 2e-5, batch 128), images padded to a
square with the mean colour first (LLaVA-1.5's image_aspect_ratio=pad).

Start from pretrained weights with --config.model.init_from: a Hugging Face LLaVA directory (e.g.
llava-1.5-7b-hf) or a workdir (stage 1's, or one made by `vlm-jax convert --from-hf LLM_DIR --vision
CLIP_DIR`), local or gs://. The checkpoint then brings the model, the tokenizer, its own chat
template and its image processor; the model fields below are the architecture for training from
scratch (and for `vlm-jax compile`). To train stage 2 on padded squares as LLaVA-1.5 did from a
checkpoint whose processor crops: --config.data.image_resize=pad_square.

For a TPU slice of 16 v5e chips (v5e-16) or 4 v5p chips (v5p-8): parameters, gradients and Adam's
moments are split over every chip (FSDP), the full LLaVA batch is reached with 8 micro-batches, and
each layer's activations are recomputed in the backward pass.
"""

from vlm_jax.config import base

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg=None):
  stage = arg or "stage2"
  if stage not in ("stage1", "stage2"):
    raise ValueError(f"stage {stage!r}: expected stage1 or stage2")
  config = base()
  config.stage = stage
  m = config.model
  # hidden_states[-2] of the 24-block tower: we run 23 blocks.
  m.vision.update(
    dict(
      flavour="clip",
      image_size=336,
      patch_size=14,
      width=1024,
      depth=23,
      heads=16,
      mlp_dim=4096,
      norm_eps=1e-5,
      keep_cls=False,
      final_norm=False,
    )
  )
  m.bridge.kind = "mlp2x_gelu"
  m.llm.update(
    dict(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008, norm_eps=1e-5)
  )
  m.remat = "full"
  d = config.data
  d.image_mean, d.image_std = CLIP_MEAN, CLIP_STD
  d.image_resize = "shortest_edge_crop" if stage == "stage1" else "pad_square"
  d.template = "plain" if stage == "stage1" else "vicuna_v1"
  d.seq_len = 2048
  config.train.batch_size = 256 if stage == "stage1" else 128
  config.train.grad_accum = 8  # stage 2 on v5e-16: 16 rows a micro-batch, 1 a chip
  config.train.lr = 1e-3 if stage == "stage1" else 2e-5
  config.train.warmup_steps = 30
  config.train.weight_decay = 0.0
  config.mesh.update(dict(data=1, fsdp=-1, tensor=1))  # ZeRO-3 over all chips: 7B + Adam is 112 GB
  return config
