"""The one attention entry point: masks from segment ids, causal or bidirectional, sliding
window, GQA; the implementations behind it (XLA's reference, blockwise, cuDNN, the Pallas kernels
of pallas_attention.py) chosen for the platform the program is built for; and the mask of a
query block against a KV cache."""

import contextlib
import contextvars
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlm_jax.models import pallas_attention


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, S] boolean: a query attends only to keys of its own (non-padding) segment."""
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


def cache_mask(start: jax.Array, q_slots: jax.Array, cache_len: int, window: int = 0) -> jax.Array:
  """[B, 1, T, S] boolean for queries at cache slots q_slots [T] over a cache of S slots whose
  row b holds its sequence from slot start[b] on (left padding): causal, and within the window
  (slots of one row are consecutive positions, so slot distance is position distance)."""
  kv = jnp.arange(cache_len)[None, None, :]
  q = q_slots[None, :, None]
  mask = (kv >= start[:, None, None]) & (kv <= q)
  if window > 0:
    mask &= kv > q - window
  return mask[:, None]


IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "splash", "pallas_gpu", "auto")  # config.model.attention
log = logging.getLogger(__name__)
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_platform", default=None)
_LOGGED: set[str] = set()
KERNEL_PLATFORMS = {"splash": "tpu", "pallas_gpu": "gpu"}  # each Pallas kernel's own platform


@contextlib.contextmanager
def on_platform(platform: str):
  """Traces inside are for `platform` ("tpu", "gpu", "cpu"): the devices of the mesh a program is
  compiled for, which differ from the default backend when compiling for a TPU from a CPU
  machine (`vlm-jax compile`). build.in_mesh sets it from its mesh."""
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def platform() -> str:
  return _PLATFORM.get() or jax.default_backend()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    log.info("%s", message)


def _cudnn_limits(q: jax.Array) -> str:
  """Why cuDNN's fused attention cannot take q (empty if it can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention needs bfloat16 or float16, not {q.dtype}"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"cuDNN attention needs a head dim <= 128 and a multiple of 8, not {q.shape[-1]}"
  return ""


def choose(implementation: str, q: jax.Array, k: jax.Array, *, causal: bool, window: int) -> str:
  """The implementation that runs: `auto` resolved for the platform, and a kernel that cannot do
  this combination replaced by `xla` (each choice logged once)."""
  target = platform()
  if implementation == "auto":
    if target == "tpu":
      chosen = "splash"
    elif target == "gpu":
      chosen = "cudnn" if not _cudnn_limits(q) else "pallas_gpu"
    else:
      chosen = "blockwise"
    _log_once(f"attention auto: {chosen} on {target}")
    implementation = chosen
  reason = ""
  if implementation in KERNEL_PLATFORMS and q.shape[1] != k.shape[1]:
    reason = f"{implementation} here is self-attention only (queries {q.shape[1]}, keys {k.shape[1]})"
  elif implementation == "pallas_gpu" and causal and window > 0:
    reason = "the Pallas GPU kernel has no sliding window"
  elif implementation == "cudnn":
    reason = f"cuDNN attention needs a GPU, not {target}" if target != "gpu" else _cudnn_limits(q)
  if reason:
    _log_once(f"attention {implementation} -> xla: {reason}")
    return "xla"
  if implementation in KERNEL_PLATFORMS and target != KERNEL_PLATFORMS[implementation]:
    _log_once(
      f"attention {implementation}: not on its platform ({target}), so in Pallas' interpreter (slow; for tests)"
    )
  return implementation


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  causal: bool,
  implementation: str = "xla",
  window: int = 0,
  block: int = 128,
) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H] with N % K == 0 -> [B,T,N,H].

  Padding queries (segment 0) come out finite, values nothing should read (each implementation
  its own); packed samples (distinct segment ids) never attend across each other. Query head n
  reads kv head n // (N // K), as HF's repeat_kv. window > 0 (causal): a query sees its last
  `window` keys, itself included (Mistral's sliding window: key > query - window).

  implementation (IMPLEMENTATIONS; `choose` resolves auto and fallbacks): "xla" is
  jax.nn.dot_product_attention's reference path; "blockwise" is `blockwise_attention` (`block`
  query positions at a time, plain XLA ops); "cudnn" is jax.nn.dot_product_attention's cuDNN
  kernel; "splash" and "pallas_gpu" are Pallas kernels (pallas_attention.py).
  """
  implementation = choose(implementation, q, k, causal=causal, window=window)
  if q_segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  if implementation == "blockwise":
    return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, window=window, block=block)
  if implementation in KERNEL_PLATFORMS:
    interpret = platform() != KERNEL_PLATFORMS[implementation]
    if implementation == "splash":
      return pallas_attention.splash(q, k, v, q_segment_ids, causal=causal, window=window, interpret=interpret)
    return pallas_attention.gpu_flash(q, k, v, q_segment_ids, causal=causal, interpret=interpret)
  mask = None if q_segment_ids is None else segment_mask(q_segment_ids, kv_segment_ids)
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=causal, implementation=implementation, local_window_size=local
  )


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B,T,N,H] against one layer's KV cache k/v [B*K,S,H] (row b's kv head j at b*K + j) under
  mask [B,1,T,S] (cache_mask) -> [B,T,N,H]. Same numerics as `attention` (fp32 logits and
  softmax, probabilities in the cache's dtype).

  Two matmuls over one batch dim (rows x kv heads) that read the cache in place: with two batch
  dims, or slots before heads, the CPU backend loops over small matmuls or copies the cache
  first, and decoding took twice as long.
  """
  b, t, n, h = q.shape
  kv_heads, slots = k.shape[0] // b, k.shape[1]
  group = n // kv_heads
  q = q.reshape(b, t, kv_heads, group, h).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, group * t, h)
  logits = jnp.einsum("nqh,nsh->nqs", q, k, preferred_element_type=jnp.float32) * (h**-0.5)
  logits = jnp.where(
    mask[:, :, None], logits.reshape(b, kv_heads, group, t, slots), 0.7 * jnp.finfo(jnp.float32).min
  )  # as jax.nn.dot_product_attention
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b * kv_heads, group * t, slots)
  out = jnp.einsum("nqs,nsh->nqh", probs, v)
  return out.reshape(b, kv_heads, group, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# --- blockwise attention: no [B, N, T, S] scores kept for the backward pass ---------------------
def _merge_heads(x: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B*K, T*G, H]: row (t, g) of kv head k. One batch dim, and each query
  block a contiguous run of rows, so every matmul below is a plain batched GEMM."""
  b, t, n, h = x.shape
  return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 1, 3, 4).reshape(b * kv_heads, -1, h)


def _split_heads(x: jax.Array, batch: int, length: int) -> jax.Array:
  """Inverse of _merge_heads."""
  bk, _, h = x.shape
  kv_heads = bk // batch
  return x.reshape(batch, kv_heads, length, -1, h).transpose(0, 2, 1, 3, 4).reshape(batch, length, -1, h)


class _Spec(NamedTuple):
  """What the blockwise kernel needs besides arrays (static)."""

  kv_heads: int
  groups: int  # query heads per kv head
  causal: bool
  window: int
  block: int


def _blocks(spec: _Spec, length: int, keys: int):
  """Query blocks [t0, t1) with the key range [s0, s1) that can be unmasked for them."""
  for t0 in range(0, length, spec.block):
    t1 = min(t0 + spec.block, length)
    s0 = max(0, t0 - spec.window + 1) if spec.causal and spec.window > 0 else 0
    s1 = min(t1, keys) if spec.causal else keys
    yield t0, t1, s0, s1


def _block_mask(
  spec: _Spec, q_seg, kv_seg, t0: int, t1: int, s0: int, s1: int, keys_first: bool = False
) -> jax.Array | None:
  """[B*K, (t1-t0)*G, s1-s0] (or its transpose with keys_first) boolean, None if all visible."""
  t = jnp.arange(t0, t1)[:, None]
  s = jnp.arange(s0, s1)[None, :]
  mask = None
  if spec.causal:
    mask = s <= t
    if spec.window > 0:
      mask &= s > t - spec.window
    mask = mask[None]
  if q_seg is not None:
    qs, ks = q_seg[:, t0:t1, None], kv_seg[:, None, s0:s1]
    seg = (qs == ks) & (ks != 0)
    mask = seg if mask is None else mask & seg
  if mask is None:
    return None
  b, groups = (q_seg.shape[0] if q_seg is not None else 1), spec.groups
  mask = jnp.broadcast_to(mask, (b, t1 - t0, s1 - s0))
  if keys_first:
    mask = jnp.broadcast_to(mask.transpose(0, 2, 1)[:, None, :, :, None], (b, spec.kv_heads, s1 - s0, t1 - t0, groups))
    return mask.reshape(b * spec.kv_heads, s1 - s0, -1)
  mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, spec.kv_heads, t1 - t0, groups, s1 - s0))
  return mask.reshape(b * spec.kv_heads, -1, s1 - s0)


def _expand_batch(mask: jax.Array | None, n: int) -> jax.Array | None:
  """A mask built for batch 1 (causal only) broadcast over the n = B*K rows."""
  if mask is None or mask.shape[0] == n:
    return mask
  return jnp.broadcast_to(mask[:1], (n,) + mask.shape[1:])


def _forward(spec: _Spec, q, k, v, q_seg, kv_seg):
  """Merged layout: q [n, T*G, H], k/v [n, S, H] -> (out [n, T*G, H], lse [n, T*G] fp32)."""
  n, rows, h = q.shape
  groups, keys = spec.groups, k.shape[1]
  length = rows // groups
  scale = h**-0.5
  outs, lses = [], []
  for t0, t1, s0, s1 in _blocks(spec, length, keys):
    qb = q[:, t0 * groups : t1 * groups]
    logits = jnp.einsum("nrh,nsh->nrs", qb, k[:, s0:s1], preferred_element_type=jnp.float32) * scale
    mask = _expand_batch(_block_mask(spec, q_seg, kv_seg, t0, t1, s0, s1), n)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # a query that sees nothing
    probs = jnp.exp(logits - top)
    total = jnp.sum(probs, axis=-1)
    out = jnp.einsum("nrs,nsh->nrh", probs.astype(v.dtype), v[:, s0:s1], preferred_element_type=jnp.float32)
    seen = total > 0
    outs.append(jnp.where(seen[..., None], out / jnp.where(seen, total, 1.0)[..., None], 0.0).astype(q.dtype))
    lses.append(jnp.where(seen, top[..., 0] + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf))
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(spec: _Spec, q, k, v, q_seg, kv_seg):
  return _forward(spec, q, k, v, q_seg, kv_seg)[0]


def _blockwise_fwd(spec: _Spec, q, k, v, q_seg, kv_seg):
  out, lse = _forward(spec, q, k, v, q_seg, kv_seg)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _blockwise_bwd(spec: _Spec, residuals, d_out):
  """Recomputes each block's probabilities from lse, keys-first ([n, S, rows]), so that every
  matmul of the backward pass is a plain GEMM and no [rows, S] matrix is ever transposed."""
  q, k, v, q_seg, kv_seg, out, lse = residuals
  n, rows, h = q.shape
  groups = spec.groups
  length, keys = rows // groups, k.shape[1]
  scale = h**-0.5
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [n, rows]
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for t0, t1, s0, s1 in _blocks(spec, length, keys):
    r0, r1 = t0 * groups, t1 * groups
    qb, dob, kb, vb = q[:, r0:r1], d_out[:, r0:r1], k[:, s0:s1], v[:, s0:s1]
    logits_t = jnp.einsum("nsh,nrh->nsr", kb, qb, preferred_element_type=jnp.float32) * scale
    probs_t = jnp.exp(logits_t - lse[:, None, r0:r1])
    mask = _expand_batch(_block_mask(spec, q_seg, kv_seg, t0, t1, s0, s1, keys_first=True), n)
    if mask is not None:
      probs_t = jnp.where(mask, probs_t, 0.0)
    dv = dv.at[:, s0:s1].add(
      jnp.einsum("nsr,nrh->nsh", probs_t.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
    )
    dprobs_t = jnp.einsum("nsh,nrh->nsr", vb, dob, preferred_element_type=jnp.float32)
    dlogits_t = (probs_t * (dprobs_t - delta[:, None, r0:r1]) * scale).astype(q.dtype)
    dk = dk.at[:, s0:s1].add(jnp.einsum("nsr,nrh->nsh", dlogits_t, qb, preferred_element_type=jnp.float32))
    dq_t = jnp.einsum("nsh,nsr->nhr", kb, dlogits_t, preferred_element_type=jnp.float32)
    dq_blocks.append(dq_t.transpose(0, 2, 1))
  dq = jnp.concatenate(dq_blocks, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  *,
  causal: bool,
  window: int = 0,
  block: int = 128,
) -> jax.Array:
  """`attention` in blocks of `block` query positions, in plain XLA ops (any backend).

  Causal blocks skip the keys after their last query (about half the work of full scores).
  The backward pass keeps only the output and the softmax normaliser (log-sum-exp) per query
  and recomputes each block's probabilities, as FlashAttention: memory is O(T) per head
  instead of O(T x S), and on CPU it avoids the transposes of [T, S] score matrices that the
  reference path's backward makes (measured: docs/performance.md "Train-step speed").
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if q_segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  spec = _Spec(kv_heads, n // kv_heads, causal, window if causal else 0, max(1, block))
  out = _blockwise(
    spec, _merge_heads(q, kv_heads), _merge_heads(k, kv_heads), _merge_heads(v, kv_heads), q_segment_ids, kv_segment_ids
  )
  return _split_heads(out, b, t)
