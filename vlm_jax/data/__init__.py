"""Host-side data: sources, tokenizers, templates, images and batches (numpy and PIL, no jax)."""

IMAGE = "<image>"  # the marker in text where an image goes; each becomes its placeholder tokens
