"""The losses, in one place: next-token cross-entropy (tokens.py, the VLM task's) and the
contrastive image-text losses (contrastive.py: CLIP's softmax, SigLIP's sigmoid)."""

from vlm_jax.losses.contrastive import clip_loss, siglip_loss
from vlm_jax.losses.tokens import chunked_token_loss, token_loss

__all__ = ["chunked_token_loss", "clip_loss", "siglip_loss", "token_loss"]
