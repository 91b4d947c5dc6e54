"""The attention entry point: every implementation (Pallas kernels in their interpreter on CPU)
gives the XLA path's outputs and gradients; `auto` and the fallbacks choose, and say so."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import attention as attention_lib
from vlm_jax.models.attention import attention

KERNELS = ("blockwise", "splash", "pallas_gpu", "cudnn", "auto")


def _qkv(batch=2, length=37, heads=6, kv_heads=2, dim=8, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (batch, length, heads, dim), dtype)
  k, v = (jax.random.normal(key, (batch, length, kv_heads, dim), dtype) for key in ks[1:])
  return q, k, v


def _outputs_and_grads(implementation, q, k, v, seg, causal, window, block=128):
  real = (seg != 0)[:, :, None, None] if seg is not None else jnp.ones((1, 1, 1, 1), bool)
  weight = jax.random.normal(jax.random.key(2), q.shape) * real  # padding queries' outputs are unread
  f = lambda q, k, v: attention(
    q, k, v, q_segment_ids=seg, causal=causal, window=window, implementation=implementation, block=block
  )
  out = jax.jit(f)(q, k, v)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weight), argnums=(0, 1, 2)))(q, k, v)
  return out * real, grads


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 5), (False, 0)])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("implementation", KERNELS)
def test_every_implementation_equals_the_reference(implementation, causal, window, segments):
  # 37 positions: not a multiple of any kernel block; GQA (3 query heads per kv head); packed
  # rows with padding (segment 0) at the end.
  q, k, v = _qkv()
  seg = jnp.asarray([[1] * 12 + [2] * 20 + [0] * 5, [1] * 37]) if segments else None
  (out_ref, grads_ref), (out, grads) = (
    _outputs_and_grads(i, q, k, v, seg, causal, window) for i in ("xla", implementation)
  )
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 5), (False, 0)])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("block", [5, 8, 64])  # 5 and 8 do not divide the 37 positions; 64 > 37
def test_blockwise_blocks_equal_the_reference(causal, window, segments, block):
  q, k, v = _qkv()
  seg = jnp.asarray([[1] * 12 + [2] * 20 + [0] * 5, [1] * 37]) if segments else None
  (out_ref, grads_ref), (out, grads) = (
    _outputs_and_grads(i, q, k, v, seg, causal, window, block) for i in ("xla", "blockwise")
  )
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)
  if segments:  # a padding query sees nothing: zeros
    assert (
      float(
        jnp.abs(
          attention(q, k, v, q_segment_ids=seg, causal=causal, implementation="blockwise", block=block)[0, 32:]
        ).max()
      )
      == 0
    )


@pytest.fixture
def fresh_log(monkeypatch, caplog):
  monkeypatch.setattr(attention_lib, "_LOGGED", set())  # each choice is logged once per process
  caplog.set_level(logging.INFO, logger=attention_lib.__name__)
  return caplog


@pytest.mark.parametrize(
  "platform,dtype,window,expected",
  [
    ("tpu", jnp.bfloat16, 0, "splash"),
    ("tpu", jnp.float32, 7, "splash"),
    ("gpu", jnp.bfloat16, 0, "cudnn"),
    ("gpu", jnp.float32, 0, "pallas_gpu"),  # cuDNN takes half precision only
    ("gpu", jnp.float32, 7, "xla"),  # ... and the Pallas GPU kernel has no window
    ("cpu", jnp.float32, 0, "blockwise"),
  ],
)
def test_auto_picks_for_the_platform_and_logs_it(fresh_log, platform, dtype, window, expected):
  q, k, _ = _qkv(dtype=dtype)
  with attention_lib.on_platform(platform):
    assert attention_lib.choose("auto", q, k, causal=True, window=window) == expected
  assert f"attention auto: {expected if expected != 'xla' else 'pallas_gpu'} on {platform}" in fresh_log.text


@pytest.mark.parametrize(
  "implementation,platform,dtype,window,reason",
  [
    ("cudnn", "cpu", jnp.bfloat16, 0, "needs a GPU"),
    ("cudnn", "gpu", jnp.float32, 0, "needs bfloat16 or float16"),
    ("pallas_gpu", "gpu", jnp.float32, 7, "no sliding window"),
  ],
)
def test_a_kernel_that_cannot_falls_back_to_xla_and_says_why(
  fresh_log, implementation, platform, dtype, window, reason
):
  q, k, _ = _qkv(dtype=dtype)
  with attention_lib.on_platform(platform):
    assert attention_lib.choose(implementation, q, k, causal=True, window=window) == "xla"
  assert f"attention {implementation} -> xla" in fresh_log.text and reason in fresh_log.text


def test_a_kernel_off_its_platform_runs_interpreted_and_says_so(fresh_log):
  q, k, _ = _qkv()
  with attention_lib.on_platform("cpu"):
    assert attention_lib.choose("splash", q, k, causal=True, window=0) == "splash"
  assert "Pallas' interpreter" in fresh_log.text
