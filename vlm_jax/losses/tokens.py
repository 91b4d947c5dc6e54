"""Next-token cross-entropy: from full logits (the reference), or chunked from the last hidden
states so that fp32 [B, T, vocab] logits never exist and only supervised positions are computed."""

import functools

import jax
import jax.numpy as jnp


def token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed fp32 cross-entropy over supervised targets, and their count."""
  logits = logits.astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_token_loss(
  hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """token_loss(hidden @ head, targets, loss_mask) without the [B, T, vocab] logits.

  Each row's supervised positions are moved to its front (a stable sort, so static shapes), then
  `chunk` positions of every row at a time go through the head: chunks past the longest row's
  supervised count are skipped, so prompts and images cost no head FLOPs. The gradients are made
  in the same pass (as Liger's fused linear cross-entropy): each chunk's logits exist once, and
  a frozen head (stage 1) gets no weight gradient. hidden [B, T, D] (after the final norm),
  head [D, vocab], both in the compute dtype; logits and the loss are fp32.
  """
  t = hidden.shape[1]
  chunk = min(chunk, t)
  weight = loss_mask.astype(jnp.float32)
  order = jnp.argsort(weight == 0, axis=1, stable=True)  # supervised positions first
  pad = -t % chunk
  sort = lambda x: jnp.pad(jnp.take_along_axis(x, order, axis=1), ((0, 0), (0, pad)))
  rows = jnp.max(jnp.sum(weight != 0, axis=1))  # positions any row needs
  loss = _head_loss(chunk, hidden, order, head, sort(targets), sort(weight), rows)
  return loss, jnp.sum(weight)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T', ...] -> [T' / chunk, B, chunk, ...]: the scanned axis first."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, t // chunk, chunk) + x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _sorted_hidden(hidden, order, length: int):
  pad = length - hidden.shape[1]
  return jnp.pad(jnp.take_along_axis(hidden, order[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))


def _chunk_logits(h, head, targets):
  """fp32 logits of one chunk, their log-sum-exp and the targets' logits."""
  logits = jnp.einsum("bcd,dv->bcv", h, head, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logits, lse, picked


def _loss_and_grads(chunk: int, hidden, order, head, targets, weight, rows, want_hidden: bool, want_head: bool):
  """The summed loss, and (as asked) d loss / d hidden [B, T, D] and d loss / d head [D, V] fp32."""
  hs = _chunks(_sorted_hidden(hidden, order, targets.shape[1]), chunk)
  xs = (hs, _chunks(targets, chunk), _chunks(weight, chunk), jnp.arange(hs.shape[0]) * chunk)
  d_head0 = jnp.zeros(head.shape, jnp.float32) if want_head else None

  def body(carry, x):
    loss, d_head = carry
    h, tgt, w, start = x

    def work():
      logits, lse, picked = _chunk_logits(h, head, tgt)
      out = [jnp.sum((lse - picked) * w)]
      if want_hidden or want_head:
        probs = jnp.exp(logits - lse[..., None])
        d_logits = (probs - jax.nn.one_hot(tgt, logits.shape[-1], dtype=probs.dtype)) * w[..., None]
        d_logits = d_logits.astype(h.dtype)
        if want_hidden:
          out.append(jnp.einsum("bcv,dv->bcd", d_logits, head, preferred_element_type=jnp.float32))
        if want_head:
          out.append(jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32))
      return tuple(out)

    def skip():
      out = [jnp.zeros((), jnp.float32)]
      out += [jnp.zeros(h.shape, jnp.float32)] if want_hidden else []
      out += [jnp.zeros(head.shape, jnp.float32)] if want_head else []
      return tuple(out)

    out = jax.lax.cond(start < rows, work, skip)
    d_h = out[1] if want_hidden else None
    if want_head:
      d_head = d_head + out[-1]
    return (loss + out[0], d_head), d_h

  (loss, d_head), d_hs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), d_head0), xs)
  d_hidden = None
  if want_hidden:  # back to each position's place: the inverse permutation, a gather (no scatter)
    inverse = jnp.argsort(order, axis=1)
    d_hidden = jnp.take_along_axis(_unchunk(d_hs), inverse[..., None], axis=1).astype(hidden.dtype)
  return loss, d_hidden, d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_loss(chunk: int, hidden, order, head, targets, weight, rows):
  return _loss_and_grads(chunk, hidden, order, head, targets, weight, rows, False, False)[0]


def _head_loss_fwd(chunk, hidden, order, head, targets, weight, rows):
  loss, d_hidden, d_head = _loss_and_grads(
    chunk,
    hidden.value,
    order.value,
    head.value,
    targets.value,
    weight.value,
    rows.value,
    hidden.perturbed,
    head.perturbed,
  )
  if d_head is not None:
    d_head = d_head.astype(head.value.dtype)
  return loss, (d_hidden, d_head)


def _head_loss_bwd(chunk, residuals, g):
  scale = lambda x: None if x is None else (x * g).astype(x.dtype)
  d_hidden, d_head = residuals
  return scale(d_hidden), None, scale(d_head), None, None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd, symbolic_zeros=True)
