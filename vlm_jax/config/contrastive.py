"""config.model.contrastive and config.model.text: the contrastive task's heads, loss and text tower."""

import ml_collections


def defaults() -> ml_collections.ConfigDict:
  # The contrastive task (vlm_jax/models/contrastive.py): its family fixes the pooling, heads and
  # loss as transformers' SiglipModel / CLIPModel; the text tower is config.model.text.
  # Family, loss and pool are checked by its owner (vlm_jax/models/contrastive.py, build.validate).
  return ml_collections.ConfigDict(
    dict(
      family="siglip",  # siglip | clip
      loss="",  # "" = the family's: siglip (sigmoid) | clip (softmax)
      embed_dim=0,
    )
  )  # the shared embedding's width (0 = the vision width; siglip: must be)


def text_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      vocab_size=0,  # 0: the tokenizer's vocabulary size
      width=128,
      depth=2,
      heads=4,
      mlp_dim=512,
      norm_eps=1e-6,
      max_len=64,  # positions (HF max_position_embeddings); captions are data.seq_len tokens
      act="",  # "" = the family's vision flavour's
      pool="",  # "" = the family's: last (SigLIP) | eos (CLIP) | argmax (original CLIP)
      eos_id=-1,
    )
  )  # pool=eos: the end-of-text id (-1: the tokenizer's EOS)
