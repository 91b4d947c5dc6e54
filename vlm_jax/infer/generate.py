"""Generation: prefill + KV-cache decode in a jitted while loop; batched, sampled, streamed.

Prompts are left-padded (every row writes the same cache slot; each keeps its own positions)
into bucketed shapes, so a handful of compiled programs serve all prompts. The decode loop runs
on the device until every row has finished (a stop token or max_new_tokens); streaming runs the
same loop a few tokens at a time.
"""

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.build import in_mesh
from vlm_jax.errors import UserError
from vlm_jax.models.llm import init_cache
from vlm_jax.models.vlm import VLM, unstack_params

SMALLEST_BUCKET = 32


def bucket(n: int) -> int:
  """n rounded up to one of four sizes per doubling (at most 25% padding), at least 32."""
  if n <= SMALLEST_BUCKET:
    return SMALLEST_BUCKET
  step = 1 << (n.bit_length() - 3)
  return -(-n // step) * step


def pad_rows(images, extra: int):
  """The image input ([B, ...] or AnyRes's dict of arrays), each array with `extra` zero rows
  appended (for padding rows: no image, or AnyRes tiles no token reads)."""
  return jax.tree.map(lambda x: np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)]), images)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen (Hugging Face's order: penalty, temperature, top-k, top-p, min-p)."""

  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0  # 0: no limit
  top_p: float = 1.0  # nucleus: the smallest set of tokens with this much mass
  min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability
  repetition_penalty: float = 1.0  # CTRL's: logits of tokens already in the sequence / penalty
  seed: int = 0  # same seed, same text (per row, whatever the batch)

  def check(self, flags: bool = False) -> None:
    """Raises UserError on a bad value, named as a field (top_p) or a CLI flag (--top-p)."""
    name = lambda field: "--" + field.replace("_", "-") if flags else field
    if not self.temperature >= 0:
      raise UserError(f"{name('temperature')}: must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"{name('top_p')}: must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise UserError(f"{name('top_k')}: must be >= 0 (0: off), got {self.top_k}")
    if not 0 <= self.min_p < 1:
      raise UserError(f"{name('min_p')}: must be in [0, 1), got {self.min_p}")
    if not self.repetition_penalty > 0:
      raise UserError(f"{name('repetition_penalty')}: must be > 0, got {self.repetition_penalty}")

  def knobs(self) -> dict:
    """The per-call values (not compiled in)."""
    return {
      "temperature": np.float32(self.temperature or 1.0),
      "top_k": np.int32(self.top_k),
      "top_p": np.float32(self.top_p),
      "min_p": np.float32(self.min_p),
      "penalty": np.float32(self.repetition_penalty),
    }


def filter_logits(logits: jax.Array, knobs: dict) -> jax.Array:
  """[B, V] -> tempered logits with -inf outside the top-k / top-p / min-p set (ties at a cut are
  kept, as in transformers)."""
  logits = logits / knobs["temperature"]
  vocab = logits.shape[-1]
  ordered = -jnp.sort(-logits, axis=-1)
  in_top_k = jnp.arange(vocab) < jnp.where(knobs["top_k"] > 0, knobs["top_k"], vocab)
  probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = in_top_k & (mass_before < knobs["top_p"])  # the first token always: its mass before is 0
  cut = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
  cut = jnp.maximum(cut, ordered[:, :1] + jnp.log(knobs["min_p"]))  # log 0 = -inf: off
  return jnp.where(logits >= cut, logits, -jnp.inf)


class State(NamedTuple):
  cache: dict
  tokens: jax.Array  # [B, N] int32: the new tokens (anything after a row's end)
  count: jax.Array  # [] int32: tokens generated so far
  done: jax.Array  # [B] bool: the row produced a stop token
  seen: jax.Array | None  # [B, V] bool: tokens in the row (repetition penalty)
  keys: jax.Array  # [B] PRNG keys, one per row


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Static:
  """What a compiled program is specialised on."""

  rows: int
  prompt_slots: int
  max_new_tokens: int
  sample: bool = False  # greedy otherwise
  penalize: bool = False  # a repetition penalty
  stop_ids: tuple[int, ...] = ()

  @property
  def cache_slots(self) -> int:
    return bucket(self.prompt_slots + self.max_new_tokens)


def _choose(logits: jax.Array, state: State, knobs: dict, st: _Static) -> jax.Array:
  if st.penalize:
    penalized = jnp.where(logits < 0, logits * knobs["penalty"], logits / knobs["penalty"])
    logits = jnp.where(state.seen, penalized, logits)
  if not st.sample:
    return greedy(logits)
  return sample(
    logits, jax.vmap(jax.random.fold_in)(state.keys, jnp.broadcast_to(state.count, state.keys.shape)), knobs
  )


def greedy(logits: jax.Array) -> jax.Array:
  """[B, V] -> the most likely token [B] as jnp.argmax picks it (the first of ties; the first NaN
  if any), as a max and a min: the CPU backend's argmax (one two-operand reduce) took three
  times as long, 5% of a batch-32 decoding step."""
  vocab = logits.shape[-1]
  hit = (logits == jnp.max(logits, axis=-1, keepdims=True)) | jnp.isnan(logits)
  return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def sample(logits: jax.Array, keys: jax.Array, knobs: dict) -> jax.Array:
  """One draw per row [B] from the filtered distribution of logits [B, V], row b with keys[b]."""
  return jax.vmap(jax.random.categorical)(keys, filter_logits(logits, knobs)).astype(jnp.int32)


def _advance(logits: jax.Array, state: State, knobs: dict, st: _Static) -> State:
  token = _choose(logits, state, knobs, st)
  rows = jnp.arange(st.rows)
  tokens = state.tokens.at[:, state.count].set(token)
  done = state.done | jnp.isin(token, jnp.asarray(st.stop_ids, jnp.int32))
  seen = state.seen.at[rows, token].set(True) if st.penalize else None
  return state._replace(tokens=tokens, count=state.count + 1, done=done, seen=seen)


def _replicated(state: State, mesh: Mesh) -> State:
  """Tokens and flags on every device: each process of a multi-host mesh reads all rows."""
  rep = parallel.replicated(mesh)
  pin = lambda x: jax.lax.with_sharding_constraint(x, rep)
  return state._replace(tokens=pin(state.tokens), count=pin(state.count), done=pin(state.done))


def _prefill(params, prompt, start, live, images, seeds, knobs, *, model: VLM, mesh: Mesh, st: _Static) -> State:
  cache = init_cache(model.cfg.llm, start, st.cache_slots, jnp.dtype(model.cfg.dtype))
  logits, cache = model.apply(
    {"params": params}, prompt, images, cache, method="prefill"
  )  # by name: the model may be a subclass (LoRA)
  seen = None
  if st.penalize:
    real = jnp.arange(st.prompt_slots)[None, :] >= start[:, None]
    seen = jnp.zeros((st.rows, logits.shape[-1]), bool).at[jnp.arange(st.rows)[:, None], prompt].max(real)
  state = State(
    cache,
    jnp.zeros((st.rows, st.max_new_tokens), jnp.int32),
    jnp.zeros((), jnp.int32),
    ~live,
    seen,
    jax.vmap(jax.random.key)(seeds),
  )
  return _replicated(_advance(logits, state, knobs, st), mesh)


def _decode(params, state: State, until, knobs, *, model: VLM, mesh: Mesh, st: _Static) -> State:
  """Decodes while count < until (<= max_new_tokens) and some row is not done."""

  def running(s: State):
    return (s.count < until) & ~jnp.all(s.done)

  def step(s: State) -> State:
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.count - 1, 1, axis=1)
    logits, cache = model.apply({"params": params}, last, s.cache, method="extend")
    return _advance(logits, s._replace(cache=cache), knobs, st)

  return _replicated(jax.lax.while_loop(running, step, state), mesh)


class Generator:
  """Generation for one model on one mesh; compiled once per (rows, prompt and cache buckets,
  max_new_tokens, greedy or sampled, penalty or not, stop tokens)."""

  def __init__(self, model: VLM, mesh: Mesh, *, pad_id: int, context: int):
    self.model, self.mesh, self.pad_id, self.context = model.clone(layer_list=True), mesh, pad_id, context
    self.batch_multiple = parallel.batch_divisor(mesh)
    self._programs: dict[_Static, tuple] = {}
    self._unstack = in_mesh(jax.jit(unstack_params), mesh)
    self._params = (None, None)  # (params, their layer-list copy): made once per params

  def _layer_list(self, params):
    """The params in the decoding layout (VLM.layer_list): one copy per params object."""
    if self._params[0] is not params:
      self._params = (None, None)  # the old copy goes first
      self._params = (params, self._unstack(params))
    return self._params[1]

  def _compiled(self, st: _Static):
    if st not in self._programs:
      kw = dict(model=self.model, mesh=self.mesh, st=st)
      self._programs[st] = (
        in_mesh(jax.jit(functools.partial(_prefill, **kw)), self.mesh),
        in_mesh(jax.jit(functools.partial(_decode, **kw), donate_argnums=1), self.mesh),
      )
    return self._programs[st]

  def programs(self, rows: int, prompt_len: int, max_new_tokens: int) -> tuple:
    """(unstack, prefill, decode): the jitted programs greedy decoding of `rows` prompts of up
    to `prompt_len` tokens runs, for ahead-of-time compilation (aot.py). Their arguments:
    unstack(params); prefill(layer-list params, tokens [rows, slots] int32, start [rows] int32,
    live [rows] bool, images, seeds [rows] uint32, knobs); decode(layer-list params, state, until
    int32, knobs), as `stream` calls them."""
    slots = bucket(prompt_len)
    st = _Static(rows=rows, prompt_slots=slots, max_new_tokens=max_new_tokens)
    return (self._unstack,) + self._compiled(st)

  def stream(
    self,
    params,
    prompts: Sequence[np.ndarray],
    images,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    every: int = 1,
  ) -> Iterator[list[list[int]]]:
    """Yields, every `every` tokens, each row's new ids since the last yield (none once a row has
    stopped; its stop token is not given). prompts: ids with their image placeholders; images:
    [B, N, H, W, 3] or AnyRes's {"tiles", "index", "weight"} (data/anyres_batch.py), B = len(prompts)."""
    sampling.check()
    if not prompts:
      raise UserError("generate: no prompts")
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    for i, p in enumerate(prompts):
      if len(p) + max_new_tokens > self.context:
        raise UserError(
          f"prompt {i}: {len(p)} prompt tokens + {max_new_tokens} new tokens (max_new_tokens) "
          f"exceed the model's context of {self.context} (config.model.llm.max_len)"
        )
    rows = -(-n // self.batch_multiple) * self.batch_multiple
    prompt_slots = bucket(longest)
    st = _Static(
      rows=rows,
      prompt_slots=prompt_slots,
      max_new_tokens=max_new_tokens,
      sample=sampling.temperature > 0,
      penalize=sampling.repetition_penalty != 1.0,
      stop_ids=tuple(sorted(set(stop_ids))),
    )
    tokens = np.full((rows, prompt_slots), self.pad_id, np.int32)
    start = np.full((rows,), prompt_slots - 1, np.int32)  # padding rows: a one-token prompt
    for i, p in enumerate(prompts):
      tokens[i, prompt_slots - len(p) :] = p
      start[i] = prompt_slots - len(p)
    padded_images = pad_rows(images, rows - n)
    seeds = np.full((rows,), sampling.seed % 2**32, np.uint32)
    knobs = sampling.knobs()
    prefill, decode = self._compiled(st)
    params = self._layer_list(params)
    state = prefill(params, tokens, start, np.arange(rows) < n, padded_images, seeds, knobs)
    given, stopped = 0, np.zeros((n,), bool)
    while True:
      out, count = np.asarray(state.tokens)[:n], int(state.count)
      pieces = []
      for i in range(n):
        new = out[i, given:count].tolist()
        stop = next((j for j, t in enumerate(new) if t in st.stop_ids), None)
        pieces.append([] if stopped[i] else new[:stop])
        stopped[i] |= stop is not None
      yield pieces
      given = count
      if count >= max_new_tokens or stopped.all():
        return
      state = decode(params, state, np.int32(min(count + every, max_new_tokens)), knobs)

  def __call__(
    self,
    params,
    prompts: Sequence[np.ndarray],
    images,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
  ) -> list[list[int]]:
    """Each prompt's new ids, up to (without) its first stop token."""
    out = [[] for _ in prompts]
    for pieces in self.stream(
      params, prompts, images, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids, every=max_new_tokens
    ):
      for row, piece in zip(out, pieces):
        row.extend(piece)
    return out
