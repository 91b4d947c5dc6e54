"""Where each component's tensors sit in a HF file: the key prefix of each slot.

Slots: vision, bridge, llm (the decoder body) and llm_head (lm_head sits outside the body). The
same LLaVA model is found under several layouts: the hub's original one
(`language_model.model.*`, `vision_tower.vision_model.*`), transformers>=4.52's
(`model.language_model.*`, `model.vision_tower.vision_model.*`, `lm_head`), transformers 5's
files (`vision_tower.*` without `vision_model.`), and standalone LLM / vision-tower directories.
A layout is found by probing one key per slot; export writes back the layout it was read from.
"""

from vlm_jax.errors import UserError

Layout = dict[str, str]

PROBES = {
  "llm": "embed_tokens.weight",
  "llm_head": "lm_head.weight",
  "vision": "embeddings.patch_embedding.weight",
  "bridge": "linear_1.weight",
  "image_newline": "image_newline",
}  # LLaVA-NeXT's row end token
CANDIDATES = {
  "llm": ("language_model.model.", "model.language_model.", "model.", ""),
  "llm_head": ("language_model.", ""),
  "vision": (
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
    "vision_model.",
    "",
  ),
  "bridge": ("multi_modal_projector.", "model.multi_modal_projector."),
  "image_newline": ("", "model."),
}
# lm_head's prefix when the file has none to probe (tied embeddings): the body's sibling.
HEAD_FOR_BODY = {"language_model.model.": "language_model.", "model.language_model.": "", "model.": "", "": ""}

# Written for models that were not read from HF: the hub's LLaVA layout, which transformers 4.x
# and 5.x both load.
LLAVA = {
  "vision": "vision_tower.vision_model.",
  "bridge": "multi_modal_projector.",
  "llm": "language_model.model.",
  "llm_head": "language_model.",
  "image_newline": "",
}


def detect(keys, slots: tuple[str, ...], where: str) -> Layout:
  """The prefix of each slot (llm_head follows llm when the head is tied and absent)."""
  keys = set(keys)
  layout = {}
  for slot in slots:
    found = [p for p in CANDIDATES[slot] if p + PROBES[slot] in keys]
    if found:
      layout[slot] = found[0]
    elif slot == "llm_head" and "llm" in layout:
      layout[slot] = HEAD_FOR_BODY[layout["llm"]]
    else:
      raise UserError(
        f"{where}: no tensor {CANDIDATES[slot][0]}{PROBES[slot]} "
        f"(nor any known layout of {PROBES[slot]}); is this the right directory?"
      )
  return layout


def component_of(key: str, layout: Layout) -> tuple[str, str]:
  """(slot, key within the slot) for a file key, longest prefix first (an empty prefix takes
  whatever is left); ("", key) if none."""
  for slot, prefix in sorted(layout.items(), key=lambda kv: -len(kv[1])):
    if key.startswith(prefix):
      return slot, key[len(prefix) :]
  return "", key
