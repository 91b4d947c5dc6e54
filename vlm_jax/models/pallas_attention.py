"""The Pallas attention kernels JAX ships, behind `attention.attention`'s calling convention.

`splash`: TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), grouped-query
heads natively (its MQA kernel once per kv head), with segment ids, causal, sliding-window and
bidirectional masks. `gpu_flash`: the Pallas Triton flash-attention kernel
(jax.experimental.pallas.ops.gpu.attention.mha): segment ids, causal or bidirectional; no sliding
window (attention.py falls back for that). On another platform each runs in Pallas' interpreter,
which is how CPU tests check them against the XLA path.

A Pallas kernel is one device's program that XLA cannot partition, so under a mesh it runs in
`shard_map`, rows split over the batch axes and heads over the tensor axis (an axis that does not
divide the dim is left replicated). Lengths are padded to the kernels' 128-row blocks; padded
keys are a segment of their own (id 0), which no real query sees.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import PartitionSpec as P

from vlm_jax.config import BATCH_AXES, TENSOR_AXIS

BLOCK = 128  # rows per kernel block: the TPU's lane width; lengths are padded to a multiple


def _pad_length(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _padded_segments(q_segment_ids: jax.Array | None, batch: int, length: int, padded: int) -> jax.Array | None:
  """Segment ids over the padded length: padding is segment 0. None if there is nothing to mask."""
  if q_segment_ids is None and padded == length:
    return None
  seg = jnp.ones((batch, length), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  return _pad_length(seg, padded)


def _splash_kernel(length: int, groups: int, causal: bool, window: int, interpret: bool):
  """The MQA splash kernel for one kv head's `groups` query heads over `length` (padded) rows."""
  shape = (length, length)
  if causal and window > 0:
    mask = splash_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  elif causal:
    mask = splash_lib.CausalMask(shape)
  else:
    mask = splash_lib.FullMask(shape)
  block = next(b for b in (512, 256, BLOCK) if length % b == 0)  # the kernel's default, or what divides
  sizes = splash_lib.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  # Made per trace, not cached: its mask tables become values of the trace it is made in.
  return splash_lib.make_splash_mqa(
    splash_lib.MultiHeadMask([mask] * groups), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _splash_local(q, k, v, seg, *, causal: bool, window: int, interpret: bool):
  """One device's rows: q [B,T,N,H], k/v [B,T,K,H], seg [B,T] | None -> [B,T,N,H]."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  kernel = _splash_kernel(t, n // kv_heads, causal, window, interpret)
  q = (q * h**-0.5).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,T,H]
  if seg is None:
    per_head = lambda q, k, v: kernel(q, k, v)
    out = jax.vmap(jax.vmap(per_head))(q, k, v)
  else:
    per_head = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash_lib.SegmentIds(s, s))
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(q, k, v, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _gpu_flash_local(q, k, v, seg, *, causal: bool, interpret: bool):
  """One device's rows through the Pallas GPU flash kernel (kv heads repeated: it has no GQA)."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  return gpu_attention.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=causal, interpret=interpret)


def _sharded(local, q, k, v, seg):
  """`local` over this device's rows and heads under the ambient mesh (jax.set_mesh), else as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES + (TENSOR_AXIS,)) <= set(mesh.axis_names):
    return local(q, k, v, seg)
  rows = BATCH_AXES if q.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None
  heads = TENSOR_AXIS if k.shape[2] % mesh.shape[TENSOR_AXIS] == 0 else None
  qkv_spec = P(rows, None, heads, None)
  specs = (qkv_spec, qkv_spec, qkv_spec) + ((P(rows, None),) if seg is not None else ())
  body = local if seg is not None else (lambda q, k, v: local(q, k, v, None))
  args = (q, k, v) + ((seg,) if seg is not None else ())
  return jax.shard_map(body, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)


def _run(local, q, k, v, q_segment_ids):
  """Pads to whole blocks, runs `local` (sharded), cuts the padding off."""
  b, t = q.shape[:2]
  padded = -(-t // BLOCK) * BLOCK
  seg = _padded_segments(q_segment_ids, b, t, padded)
  q, k, v = (_pad_length(x, padded) for x in (q, k, v))
  return _sharded(local, q, k, v, seg)[:, :t]


def splash(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_segment_ids: jax.Array | None,
  *,
  causal: bool,
  window: int,
  interpret: bool,
) -> jax.Array:
  """Self-attention (T == S) q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H] with TPU splash attention."""
  local = functools.partial(_splash_local, causal=causal, window=window if causal else 0, interpret=interpret)
  return _run(local, q, k, v, q_segment_ids)


def gpu_flash(
  q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None, *, causal: bool, interpret: bool
) -> jax.Array:
  """Self-attention (T == S) q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H] with the Pallas GPU kernel."""
  local = functools.partial(_gpu_flash_local, causal=causal, interpret=interpret)
  return _run(local, q, k, v, q_segment_ids)
