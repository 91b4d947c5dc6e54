"""Small building blocks shared by the ViT, the bridge and the LLM."""

from typing import Callable, NamedTuple

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
    in_shape = x.shape[x.ndim - self.n_in:]
    ndim = self.n_in + len(self.features)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(self.n_in)),
                                        out_axis=tuple(range(self.n_in, ndim)))
    kernel = self.param("kernel", logical(init, self.axes), in_shape + self.features, jnp.float32)
    # A QLoRA kernel (models/lora.py) is not an array but qwix's quantized one, which qwix's
    # dot_general reads as it is; jnp.tensordot would refuse it.
    if isinstance(kernel, jax.Array):
      kernel = kernel.astype(self.dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ()))).astype(self.dtype)
    if self.use_bias:
      bias_axes = self.bias_axes or self.axes[self.n_in:]
      bias = self.param("bias", logical(nn.initializers.zeros_init(), bias_axes), self.features,
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: tuple[str | None, ...], *, name: str, dtype: Dtype, n_in: int = 1,
          use_bias: bool = False, bias_axes: tuple[str | None, ...] | None = None) -> Dense:
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
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=logical(nn.initializers.ones_init(), ("embed",)),
                      bias_init=logical(nn.initializers.zeros_init(), ("embed",)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),          # exact erf (HF "gelu")
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),      # SigLIP
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),        # CLIP
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
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device",
                                                                      offload_dst="pinned_host"),
}


class Compute(NamedTuple):
  """How the layers compute (config.model's remat, attention and scan fields), not what: any
  choice here gives the same loss and gradients."""
  remat: str = "none"
  attention: str = "xla"        # attention.IMPLEMENTATIONS
  attention_block: int = 128    # query positions per block of blockwise attention
  scan_unroll: int = 1          # layers per iteration of the loop over layers; 0: no loop
  loss_chunk: int = 0           # positions per row per step of the chunked loss; 0: full logits

  @classmethod
  def of(cls, model_cfg) -> "Compute":
    return cls(model_cfg.remat, model_cfg.attention, model_cfg.attention_block, model_cfg.scan_unroll,
               model_cfg.loss_chunk)


def rematted(block: type[nn.Module], compute: Compute) -> type[nn.Module]:
  """`block` under config.model.remat's policy (itself with none)."""
  if compute.remat == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[compute.remat], prevent_cse=False)


def stacked_slice(owner: nn.Module, name: str, lo: int, hi: int | None = None):
  """Params of layers lo..hi-1 of `owner`'s stack_layers child `name` (hi None: layer lo alone,
  without the layer axis), for running part of a stack as a module applied to them: ToMe's token
  count shrinks every layer and cross-attention fusion runs between layers, which one scan
  cannot do. The params keep their stacked layout (checkpoints, imports, LoRA targets). At init,
  only once the stack itself has created them (their logical-axis boxes are dropped: the slices
  have no layer axis).
  """
  stacked = nn.meta.unbox(owner.variables["params"][name])
  return jax.tree.map(lambda a: a[lo] if hi is None else a[lo:hi], stacked)


def stack_layers(block: type[nn.Module], depth: int, compute: Compute, n_broadcast: int = 0, **kwargs):
  """`depth` copies of `block` under nn.scan (params get a leading 'layers' axis), optionally rematted.

  The block takes a `compute` field (given this one); its __call__ takes (carry, *broadcast_args)
  and returns (carry, None). Unrolled (compute.scan_unroll), the params keep their stacked
  layout: the choice is one of speed and compile time (README "Train-step speed").
  """
  block = rematted(block, compute)
  unroll = depth if compute.scan_unroll <= 0 else min(compute.scan_unroll, depth)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * n_broadcast, length=depth, unroll=unroll,
                 metadata_params={nn.PARTITION_NAME: "layers"})(compute=compute, **kwargs)
