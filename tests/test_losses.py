"""Contrastive losses (vlm_jax.losses): CLIP and SigLIP, and their gradients, equal float64 numpy
implementations of their formulas; CLIP's scale is clipped at log(100); on 8 simulated devices
over any batch mesh they equal the one-device loss and gradients, SigLIP without gathering the
texts; a batch that does not divide over the shards is a ValueError."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import losses, parallel

LOG100 = math.log(100.0)


def embeddings(b: int, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two [b, d] fp32 arrays of unit rows; texts near their images so the diagonal matters."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  y = x + rng.normal(size=(b, d))
  unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
  return unit(x), unit(y)


# --- float64 numpy references: the value and its analytic gradients --------------------------------


def _softmax(a: np.ndarray) -> np.ndarray:
  e = np.exp(a - a.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _lse(a: np.ndarray) -> np.ndarray:
  m = a.max(axis=1)
  return m + np.log(np.exp(a - m[:, None]).sum(axis=1))


def clip_reference(x, y, logit_scale):
  """(loss, dx, dy, d logit_scale) of mean(CE(image->text), CE(text->image))."""
  x, y = np.float64(x), np.float64(y)
  b = len(x)
  s = np.exp(min(logit_scale, LOG100))
  sims = x @ y.T
  a = s * sims
  diag = np.trace(a)
  loss = (_lse(a).sum() - diag + _lse(a.T).sum() - diag) / (2 * b)
  g = ((_softmax(a) - np.eye(b)) + (_softmax(a.T) - np.eye(b)).T) / (2 * b)  # dloss / da
  dscale = s * np.sum(g * sims) if logit_scale < LOG100 else 0.0
  return loss, s * g @ y, s * g.T @ x, dscale


def siglip_reference(x, y, t_prime, bias):
  """(loss, dx, dy, dt_prime, dbias) of -sum_ij log_sigmoid(label_ij z_ij) / B."""
  x, y = np.float64(x), np.float64(y)
  b = len(x)
  t = np.exp(t_prime)
  sims = x @ y.T
  z = t * sims + bias
  labels = 2 * np.eye(b) - 1
  m = labels * z
  loss = -np.sum(np.minimum(m, 0) - np.log1p(np.exp(-np.abs(m)))) / b  # log_sigmoid, stably
  g = -labels / (1 + np.exp(m)) / b  # dloss / dz = -label * sigmoid(-label z) / B
  return loss, t * g @ y, t * g.T @ x, t * np.sum(g * sims), np.sum(g)


def assert_close(got, want):
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-6)


clip_grad = jax.jit(jax.value_and_grad(losses.clip_loss, argnums=(0, 1, 2)))
siglip_grad = jax.jit(jax.value_and_grad(losses.siglip_loss, argnums=(0, 1, 2, 3)))


def flat(value_and_grads):
  value, grads = value_and_grads
  return (value, *grads)


# --- The formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 3, 8, 16])
def test_clip_equals_reference(b):
  x, y = embeddings(b, seed=b)
  for scale in (0.0, math.log(10.0), 4.0):
    assert_close(flat(clip_grad(x, y, np.float32(scale))), clip_reference(x, y, np.float32(scale)))


@pytest.mark.parametrize("b", [1, 3, 8, 16])
def test_siglip_equals_reference(b):
  x, y = embeddings(b, seed=b)
  for t_prime, bias in ((math.log(10.0), -10.0), (0.0, 0.5), (2.0, -3.0)):
    t_prime, bias = np.float32(t_prime), np.float32(bias)
    assert_close(flat(siglip_grad(x, y, t_prime, bias)), siglip_reference(x, y, t_prime, bias))


def test_computed_in_fp32():
  x, y = (jnp.asarray(a, jnp.bfloat16) for a in embeddings(4))
  assert jax.jit(losses.clip_loss)(x, y, jnp.bfloat16(2.0)).dtype == jnp.float32
  assert jax.jit(losses.siglip_loss)(x, y, jnp.bfloat16(2.0), jnp.bfloat16(-1.0)).dtype == jnp.float32


def test_clip_scale_is_clipped_at_log_100():
  x, y = embeddings(8)
  at, _, _, _ = flat(clip_grad(x, y, np.float32(LOG100)))
  above, _, _, dscale = flat(clip_grad(x, y, np.float32(LOG100 + 1.0)))
  np.testing.assert_allclose(above, at, rtol=1e-6)
  assert dscale == 0.0
  below, _, _, dbelow = flat(clip_grad(x, y, np.float32(LOG100 - 0.5)))
  assert below != at and dbelow != 0.0  # the clip is the only reason for the two above


# --- Sharded over a mesh --------------------------------------------------------------------------


def mesh_of(data: int, fsdp: int, tensor: int):
  return parallel.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def on_mesh(mesh, f, x, y, *scalars):
  """f(x, y, *scalars) jitted under the mesh, the embeddings split over the batch axes."""
  with jax.set_mesh(mesh):
    x, y = (jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (x, y))
    return f(x, y, *scalars)


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_equals_one_device(sizes):
  x, y = embeddings(16, seed=1)
  scalars = {clip_grad: (np.float32(2.5),), siglip_grad: (np.float32(2.0), np.float32(-3.0))}
  for f, args in scalars.items():
    want = flat(f(x, y, *args))
    got = flat(on_mesh(mesh_of(*sizes), f, x, y, *args))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def compiled_text(mesh, f, x, y, *scalars) -> str:
  with jax.set_mesh(mesh):
    x, y = (jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (x, y))
    return f.lower(x, y, *scalars).compile().as_text()


def test_sharded_siglip_passes_texts_round_the_ring_without_gathering():
  """After SPMD partitioning the SigLIP step (forward and backward) moves the texts with
  collective-permutes and never all-gathers; CLIP, which must gather, shows the check sees one."""
  mesh, (x, y) = mesh_of(2, 4, 1), embeddings(16)
  siglip = compiled_text(mesh, siglip_grad, x, y, np.float32(2.0), np.float32(-3.0))
  assert "collective-permute" in siglip and "all-gather" not in siglip
  assert "all-gather" in compiled_text(mesh, clip_grad, x, y, np.float32(2.5))


def test_batch_must_divide_over_the_shards():
  x, y = embeddings(12)  # not put on the mesh: device_put would refuse 12 rows over 8 shards first
  for f, scalars in ((losses.clip_loss, (2.0,)), (losses.siglip_loss, (2.0, -3.0))):
    with jax.set_mesh(mesh_of(2, 4, 1)), pytest.raises(ValueError, match="12 does not divide over the 8"):
      jax.jit(f)(x, y, *scalars)
    with jax.set_mesh(mesh_of(1, 4, 2)):  # 12 rows over 4 shards: fine
      jax.jit(f)(x, y, *scalars)
