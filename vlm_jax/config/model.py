"""config.model's model-wide fields: compute dtype, remat, attention, the loops, init_from, fusion.
Its parts (vision, contrastive and text, anyres, bridge, llm) have their own owners."""

import ml_collections

from vlm_jax.errors import UserError

VLM_COMPONENTS = ("vision", "bridge", "llm")  # the VLM params tree's top-level parts
COMPONENTS = VLM_COMPONENTS + ("text",)  # what trains and its lr_mult; text: the contrastive task's tower


def defaults() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.dtype = "bfloat16"  # compute dtype; params and optimizer state are fp32
  # What the backward pass recomputes (vlm_jax/models/layers.py REMAT_POLICIES): none | full |
  # dots | dots_with_no_batch_dims | offload (the latter's saved matmuls in host memory)
  m.remat = "none"
  # Ways to compute, each giving the same loss and gradients (docs/performance.md "Train-step speed"):
  # xla (reference) | blockwise | cudnn (GPU) | splash (TPU) | pallas_gpu | auto (the platform's
  # best: splash on TPU, cuDNN or pallas_gpu on GPU, blockwise on CPU); vlm_jax/models/attention.py
  m.attention = "auto"
  m.attention_block = 128  # blockwise: query positions per block
  m.scan_unroll = 1  # layers per iteration of the loop over layers; 0: unrolled
  m.loss_chunk = 256  # loss over supervised positions, this many per row at a time; 0: full logits
  # A checkpoint (workdir, step dir or Hugging Face LLaVA dir) whose params start a fresh run,
  # e.g. an LLM + vision tower assembled by `vlm-jax convert --vision` for stage 1. A resumed run
  # continues from its own checkpoint instead.
  m.init_from = ""
  # How the visual tokens reach the LLM (vlm_jax/models/fusion.py): tokens (LLaVA: written into the
  # sequence, image_tokens placeholders an image) | cross_attention (Flamingo: the sequence keeps
  # one <image> marker an image; gated cross-attention blocks between the LLM's layers read the
  # bridge's tokens of the latest image before each text token; config.model.cross_attention).
  m.fusion = "tokens"
  m.cross_attention = ml_collections.ConfigDict(
    dict(
      every=1,  # a block before every k-th LLM layer (layers k-1, 2k-1, ...; Flamingo-9B: 4)
      heads=0,
      head_dim=0,  # 0: the LLM's
      mlp_dim=0,
    )
  )  # the gated dense block's hidden width (0: 4 x llm.width)
  return m


def check(m: ml_collections.ConfigDict) -> None:
  """The model-wide numbers' ranges; remat, attention and fusion name registry entries (build.validate)."""
  if m.attention_block < 1:
    raise UserError(f"config.model.attention_block must be >= 1, got {m.attention_block}")
  if m.loss_chunk < 0:
    raise UserError(f"config.model.loss_chunk must be >= 0 (0: full logits), got {m.loss_chunk}")
  if m.scan_unroll < 0:
    raise UserError(f"config.model.scan_unroll must be >= 0 (0: unrolled), got {m.scan_unroll}")
