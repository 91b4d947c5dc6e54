"""The whole config: base() composes the owners' defaults, validate() runs their checks."""

import ml_collections

from vlm_jax.config import anyres, bridge, contrastive, data, devices, evals, llm, lora, model, train, vision
from vlm_jax.config.checks import check_fields, check_one_of

STAGES = ("stage1", "stage2", "full")


def base() -> ml_collections.ConfigDict:
  """Every field with its default; each owner's module documents its fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What a batch holds and how the loss is made (vlm_jax/tasks.py): vlm (images + conversations,
  # next-token loss) | contrastive (image-caption pairs, CLIP / SigLIP loss; config.model.text)
  c.task = "vlm"
  c.stage = "full"  # stage1: bridge; stage2: bridge + llm; full: everything
  c.model = model.defaults()
  c.model.vision = vision.defaults()
  c.model.contrastive = contrastive.defaults()
  c.model.text = contrastive.text_defaults()
  c.model.anyres = anyres.defaults()
  c.model.bridge = bridge.defaults()
  c.model.llm = llm.defaults()
  c.data = data.defaults()
  c.train = train.defaults()
  c.lora = lora.defaults()
  c.mesh = devices.mesh_defaults()
  c.xla = devices.xla_defaults()
  c.evals = evals.defaults()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """No unknown fields, and each owner's checks; changes nothing. The choices that name a registry
  entry (task, bridge kind, vision flavour, activations, remat policy) are build.validate's."""
  check_fields(config, base())
  check_one_of("config.stage", config.stage, STAGES)
  model.check(config.model)
  vision.check(config.model.vision)
  llm.check(config.model.llm)
  data.check(config.data)
  anyres.check(config)
  train.check(config.train)
  lora.check_lora(config.lora)
  devices.check_xla(config.xla)
  evals.check(config.evals)
