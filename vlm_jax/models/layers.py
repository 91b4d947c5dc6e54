"""Small building blocks shared by the ViT, the bridge and the LLM."""

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def logical(init: Callable, axes: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Names an activation's axes; the rules table maps them to the mesh."""
  return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
  """x[..., *in] @ kernel[*in, *out] (+ bias) with logical axes on the kernel; fp32 params.

  Unlike nn.DenseGeneral, the kernel is created at its full rank, so its logical axes apply
  during a sharded init.
  """

  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  n_in: int = 1
  use_bias: bool = False
  bias_axes: tuple[str | None, ...] | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.n_in :]
    ndim = self.n_in + len(self.features)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(self.n_in)), out_axis=tuple(range(self.n_in, ndim)))
    kernel = self.param("kernel", logical(init, self.axes), in_shape + self.features, jnp.float32)
    # A QLoRA kernel (models/lora.py) is not an array but qwix's quantized one, which qwix's
    # dot_general reads as it is; jnp.tensordot would refuse it.
    if isinstance(kernel, jax.Array):
      kernel = kernel.astype(self.dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ()))).astype(self.dtype)
    if self.use_bias:
      bias_axes = self.bias_axes or self.axes[self.n_in :]
      bias = self.param("bias", logical(nn.initializers.zeros_init(), bias_axes), self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(
  features,
  axes: tuple[str | None, ...],
  *,
  name: str,
  dtype: Dtype,
  n_in: int = 1,
  use_bias: bool = False,
  bias_axes: tuple[str | None, ...] | None = None,
) -> Dense:
  feats = features if isinstance(features, tuple) else (features,)
  return Dense(feats, axes, n_in, use_bias, bias_axes, dtype, name=name)


class RMSNorm(nn.Module):
  """Llama RMSNorm, computed in fp32. The gain is `offset + scale`: Gemma stores scale - 1
  (offset 1), so its checkpoints load unchanged; scale is initialised to a unit gain either way."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.constant(1.0 - self.offset)
    scale = self.param("scale", logical(init, ("embed",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    gain = scale + self.offset if self.offset else scale
    return (x32 * gain).astype(self.dtype)


def layer_norm(name: str, eps: float, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
    scale_init=logical(nn.initializers.ones_init(), ("embed",)),
    bias_init=logical(nn.initializers.zeros_init(), ("embed",)),
  )


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf (HF "gelu")
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # SigLIP
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
  "silu": jax.nn.silu,
}

# config.model.remat -> what a layer's forward pass keeps for the backward pass, the rest being
# recomputed (None: no remat, everything kept). "offload" keeps what dots_with_no_batch_dims does,
# in pinned host memory (TPU/GPU); on CPU, where device memory is host memory, it is the same.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,  # every matmul's output
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections, not attention
  "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host"),
}


class Compute(NamedTuple):
  """How the layers compute (config.model's remat, attention and scan fields), not what: any
  choice here gives the same loss and gradients."""

  remat: str = "none"
  attention: str = "xla"  # attention.IMPLEMENTATIONS
  attention_block: int = 128  # query positions per block of blockwise attention
  scan_unroll: int = 1  # layers per iteration of the loop over layers; 0: no loop
  loss_chunk: int = 0  # positions per row per step of the chunked loss; 0: full logits

  @classmethod
  def of(cls, model_cfg) -> "Compute":
    return cls(
      model_cfg.remat, model_cfg.attention, model_cfg.attention_block, model_cfg.scan_unroll, model_cfg.loss_chunk
    )


def rematted(block: type[nn.Module], compute: Compute) -> type[nn.Module]:
  """`block` under config.model.remat's policy (itself with none)."""
  if compute.remat == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[compute.remat], prevent_cse=False)


class LayerStack(nn.Module):
  """`depth` copies of `block` with one set of stacked params (a leading 'layers' axis), run as
  one nn.scan, optionally rematted; the block takes a `compute` field, its __call__ takes
  (carry, *broadcast) and returns (carry, None).

  `inserts` {layer: fn(carry) -> carry} run between layers (cross-attention fusion): the layers
  between two inserts run as one scan over their slice of the stack. `one_by_one` (block fields,
  e.g. ToMe's merge) runs the layers one at a time with those fields: ToMe's carry shrinks every
  layer, which a scan cannot carry. The slices are views of the stacked params in the module tree (nn.map_variables
  under this module's scope), so checkpoints keep one layout and LoRA adapts every layer.
  Unrolled (compute.scan_unroll) the params keep their stacked layout too: that choice is one of
  speed and compile time (docs/performance.md "Train-step speed").
  """

  block: type[nn.Module]
  depth: int
  compute: Compute
  n_broadcast: int = 0
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the block's other fields

  @nn.compact
  def __call__(
    self, carry, *broadcast, inserts: Mapping[int, Callable] | None = None, one_by_one: Mapping[str, Any] | None = None
  ):
    inserts = inserts or {}
    if not inserts and one_by_one is None:
      return self._layers(self._scan(self.depth), "all")(carry, *broadcast)
    if self.is_initializing():  # the stacked params (and adapters) the slices read
      self._layers(self._scan(self.depth), "all")(carry, *broadcast)
    if one_by_one is not None:
      for i in range(self.depth):
        carry = inserts[i](carry) if i in inserts else carry
        layer = self._layers(self._view(rematted(self.block, self.compute), i, None), f"layer_{i}", **one_by_one)
        carry, _ = layer(carry, *broadcast)
      return carry, None
    bounds = sorted(set(inserts) | {0, self.depth})
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      carry = inserts[lo](carry) if lo in inserts else carry
      carry, _ = self._layers(self._view(self._scan(hi - lo), lo, hi), f"layers_{lo}_{hi}")(carry, *broadcast)
    return carry, None

  def _scan(self, length: int):
    unroll = length if self.compute.scan_unroll <= 0 else min(self.compute.scan_unroll, length)
    return nn.scan(
      rematted(self.block, self.compute),
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * self.n_broadcast,
      length=length,
      unroll=unroll,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )

  @staticmethod
  def _view(module, lo: int, hi: int | None):
    """`module` reading layers lo..hi-1 of the stacked params (hi None: layer lo, no layer axis)."""
    take = lambda a: a[lo] if hi is None else a[lo:hi]
    return nn.map_variables(module, "params", lambda v: jax.tree.map(take, nn.meta.unbox(v)), init=False, mutable=False)

  def _layers(self, module: type[nn.Module], name: str, **fields) -> nn.Module:
    """An instance of `module` (the block, scanned or viewed) whose params are this module's:
    "layers/q/kernel", not "layers/all/q/kernel"."""
    child = module(compute=self.compute, **self.fields, **fields, name=name)
    nn.share_scope(self, child)
    return child
