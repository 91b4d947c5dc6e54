"""Generation: the KV-cache decode equals uncached recomputation, rows are independent of their
batch, sampling draws from the exact truncated distribution, streaming joins to the answer, and
the CLI (generate, chat) says bad input in one line."""

import io
import json
import os

import jax
import numpy as np
import PIL.Image
import pytest
import torch

import hf_models
import vlm_jax
from helpers import tiny_config
from vlm_jax import build as build_lib
from vlm_jax import chat as chat_lib
from vlm_jax import cli
from vlm_jax import parallel
from vlm_jax.infer import generate
from vlm_jax.infer.generate import Generator, Sampling
from vlm_jax.infer.text import TextStream
from vlm_jax.models.vlm import image_tokens

VOCAB, IMAGE_ID, PAD = 64, 63, 0
NEW = 12
VARIANTS = {"gqa": {}, "sliding_window": {"model.llm.sliding_window": 3}}


def _run(variant: str):
  config = tiny_config({"model.llm.vocab_size": VOCAB, **VARIANTS[variant]})
  run = build_lib.build(config, parallel.inference_mesh(), IMAGE_ID)
  # Larger weights than the initialisers' so that logits are far from uniform (no near ties).
  params = jax.tree.map(lambda x: x * 3, run.init_params(jax.random.key(1)))
  return config, run, params


def _prompts(config, n: int = 8):
  """n prompts of different lengths, each [BOS] + an image's placeholders + words, with images."""
  rng = np.random.default_rng(0)
  n_image = image_tokens(config.model)
  prompts = [
    np.asarray([1] + [IMAGE_ID] * n_image + rng.integers(3, IMAGE_ID, 1 + 2 * i).tolist(), np.int32) for i in range(n)
  ]
  size = config.model.vision.image_size
  images = rng.normal(size=(n, 1, size, size, 3)).astype(np.float32)
  return prompts, images


def _uncached(run, params, prompt: np.ndarray, image: np.ndarray, new: int) -> list[int]:
  """Greedy by recomputing the whole sequence for every token (no cache), fp32."""
  total = len(prompt) + new
  forward = jax.jit(
    lambda p, t, im: run.model.apply({"params": p}, t, im, np.arange(total)[None], np.ones((1, total), np.int32))
  )
  tokens = np.zeros((1, total), np.int32)
  tokens[0, : len(prompt)] = prompt
  for n in range(len(prompt), total):
    tokens[0, n] = int(np.argmax(np.asarray(forward(params, tokens, image[None]))[0, n - 1]))
  return tokens[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_uncached_and_rows_are_independent_of_their_batch(variant):
  config, run, params = _run(variant)
  prompts, images = _prompts(config)
  gen = Generator(run.model, run.mesh, pad_id=PAD, context=config.model.llm.max_len)
  batch = gen(params, prompts, images, max_new_tokens=NEW)
  for i, (prompt, image) in enumerate(zip(prompts, images)):
    assert batch[i] == _uncached(run, params, prompt, image, NEW), i
    assert gen(params, [prompt], images[i : i + 1], max_new_tokens=NEW)[0] == batch[i], i
  assert len({tuple(row) for row in batch}) > 1 and any(len(set(row)) > 2 for row in batch)  # not degenerate
  assert len(gen._programs) == 1  # prompts of 6 to 20 tokens, alone or together: one bucket, one program
  # A stop token ends its row there (the token itself not given); other rows go on.
  stop = batch[0][4]
  cut = gen(params, prompts, images, max_new_tokens=NEW, stop_ids=[stop])
  for row, full in zip(cut, batch):
    assert row == (full[: full.index(stop)] if stop in full else full)
  # Temperature -> 0 is greedy.
  assert gen(params, prompts, images, max_new_tokens=NEW, sampling=Sampling(temperature=1e-6, seed=3)) == batch


def test_generation_on_a_data_fsdp_tensor_mesh_equals_one_device():
  """Rows split over data x fsdp and the cache's KV heads over tensor: the same tokens."""
  config, run, params = _run("gqa")
  prompts, images = _prompts(config, 4)
  one = build_lib.build(config, parallel.make_mesh(config.mesh, jax.devices()[:1]), IMAGE_ID)
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  split = build_lib.build(config, parallel.make_mesh(config.mesh), IMAGE_ID)
  outputs = []
  for r in (one, split):
    placed = jax.device_put(params, r.param_shardings)
    gen = Generator(r.model, r.mesh, pad_id=PAD, context=config.model.llm.max_len)
    outputs.append(gen(placed, prompts, images, max_new_tokens=NEW, sampling=Sampling(temperature=1.0, seed=1)))
  assert outputs[0] == outputs[1]


def test_sampling_is_seeded_per_row():
  config, run, params = _run("gqa")
  prompts, images = _prompts(config)
  gen = Generator(run.model, run.mesh, pad_id=PAD, context=config.model.llm.max_len)
  sampled = lambda seed, p, im: gen(params, p, im, max_new_tokens=NEW, sampling=Sampling(temperature=1.5, seed=seed))
  first = sampled(7, prompts, images)
  assert sampled(7, prompts, images) == first
  assert sampled(8, prompts, images) != first
  assert sampled(7, prompts[3:4], images[3:4])[0] == first[3]  # alone as in the batch
  assert first != gen(params, prompts, images, max_new_tokens=NEW)  # it did sample


def _exact(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
  """The truncated distribution, written from the definitions (Hugging Face's warpers)."""
  z = logits / temperature
  order = np.argsort(-z)
  keep = np.zeros(len(z), bool)
  keep[order[: top_k or len(z)]] = True
  p = np.exp(z - z.max()) * keep
  p /= p.sum()
  mass = 0.0
  for t in order:  # nucleus: tokens while the mass before them is below top_p
    if keep[t]:
      keep[t] = mass < top_p
      mass += p[t]
  keep &= np.exp(z - z.max()) >= min_p  # min-p: relative to the most likely token
  p = np.exp(z - z.max()) * keep
  return p / p.sum()


@pytest.mark.parametrize(
  "temperature,top_k,top_p,min_p",
  [(0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.9, 8, 0.9, 0.05)],
)
def test_sampling_draws_the_exact_truncated_distribution(temperature, top_k, top_p, min_p):
  logits = np.random.default_rng(0).normal(0, 2, 16).astype(np.float32)
  want = _exact(logits.astype(np.float64), temperature, top_k, top_p, min_p)
  n = 40000
  knobs = Sampling(temperature, top_k, top_p, min_p).knobs()
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(jax.jit(generate.sample)(np.broadcast_to(logits, (n, 16)), keys, knobs))
  counts = np.bincount(draws, minlength=16)
  kept = want > 0
  assert counts[~kept].sum() == 0, "a token outside the kept set was drawn"
  assert 1 < kept.sum() < 16 or (top_k, top_p, min_p) == (0, 1.0, 0.0)
  expected = n * want[kept]
  chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
  dof = int(kept.sum()) - 1
  # The chi-square 0.999 quantile (Wilson-Hilferty): a correct sampler fails 1 seed in 1000;
  # this seed is fixed, so the test is deterministic.
  threshold = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
  assert chi2 < threshold, (chi2, threshold)


def test_greedy_picks_what_argmax_picks():
  logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32)
  logits[0, [7, 5]] = 9.0  # a tie: the first
  logits[1, [40, 3]] = np.nan  # NaN: the first NaN
  logits[2] = -np.inf
  logits[3, 299] = np.inf
  logits[4, :] = 1.0
  np.testing.assert_array_equal(generate.greedy(logits), np.argmax(logits, axis=-1))


def test_text_stream_never_cuts_a_character():
  """Pieces from a byte-level tokenizer join to the text and never hold half a character."""
  text = "  héllo wörld 😀 日本  "

  class Bytes:
    def decode(self, ids):
      return bytes(ids).decode("utf-8", errors="replace")

  stream = TextStream(Bytes())
  pieces = [stream.push([b]) for b in text.encode()]
  assert "".join(pieces) == text.strip()
  assert not any("\ufffd" in p for p in pieces)


# --- Through the Python API and the CLI on a Hugging Face checkpoint ----------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("llava"))
  hf, _ = hf_models.save_llava(d, seed=2)
  hf_models.edit_json(os.path.join(d, "config.json"), **{"text_config.max_position_embeddings": 40})
  images = []
  for i, size in enumerate([(24, 40), (40, 24)]):
    path = os.path.join(d, f"image{i}.png")
    PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, size + (3,), np.uint8)).save(path)
    images.append(path)
  return {"dir": d, "model": vlm_jax.load(d, dtype="float32"), "images": images, "hf": hf}


QUESTION = "what color is the circle"


def test_stream_joins_to_generate_and_the_cli_prints_it(checkpoint, capsys):
  model, path = checkpoint["model"], checkpoint["images"][0]
  image = PIL.Image.open(path)
  answer = model.generate([image], [QUESTION], max_new_tokens=8)[0]
  pieces = list(model.stream([image], [QUESTION], max_new_tokens=8))
  assert len(pieces) > 1 and "".join(pieces) == answer
  assert (
    cli.main(
      ["generate", "--checkpoint", checkpoint["dir"], "--image", path, "--prompt", QUESTION, "--max-new-tokens", "8"]
    )
    == 0
  )
  assert capsys.readouterr().out == answer + "\n"
  # Sampling flags reach the sampler: the same seed, the same text as the API.
  sampled = model.generate([image], [QUESTION], max_new_tokens=8, temperature=1.0, top_k=10, seed=4)[0]
  assert (
    cli.main(
      [
        "generate",
        "--checkpoint",
        checkpoint["dir"],
        "--image",
        path,
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "8",
        "--temperature",
        "1",
        "--top-k",
        "10",
        "--seed",
        "4",
        "--json",
      ]
    )
    == 0
  )
  assert json.loads(capsys.readouterr().out)["text"] == sampled


def test_several_images_in_one_prompt(checkpoint, capsys):
  model, paths = checkpoint["model"], checkpoint["images"]
  images = [PIL.Image.open(p) for p in paths]
  ids = model.encode_prompt(QUESTION, image=images)
  assert (ids == model.tokenizer.image_id).sum() == 2 * model.image_tokens
  expected = model.generate_ids([images], [QUESTION], max_new_tokens=6)[0]
  # transformers on the same ids and pixels (both images, in order): the same logits and tokens.
  pixels = model.pixels([images])
  normalised = np.asarray(model.run.model.apply({}, pixels[0], method="pixels"))  # uint8 -> the ViT's input
  theirs_pixels = torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    theirs = checkpoint["hf"](input_ids=torch.tensor(ids[None]), pixel_values=theirs_pixels).logits.numpy()
    out = (
      checkpoint["hf"]
      .generate(
        input_ids=torch.tensor(ids[None]),
        pixel_values=theirs_pixels,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=hf_models.PAD,
      )[0, len(ids) :]
      .tolist()
    )
  positions = np.arange(len(ids))[None]
  ours = model.run.model.apply({"params": model.params}, ids[None], pixels, positions, np.ones_like(positions))
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
  assert expected == (out[: out.index(hf_models.EOS)] if hf_models.EOS in out else out)
  assert (
    cli.main(
      [
        "generate",
        "--checkpoint",
        checkpoint["dir"],
        "--image",
        paths[0],
        "--image",
        paths[1],
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "6",
        "--json",
      ]
    )
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["token_ids"] == expected and out["image_tokens"] == 2 * model.image_tokens


def test_chat_keeps_the_conversation(checkpoint):
  model, path = checkpoint["model"], checkpoint["images"][0]
  image = PIL.Image.open(path)
  lines = iter([f"/image {path}", QUESTION, "is the circle red", "/image /nonexistent.png", "/reset", "/quit"])
  out = io.StringIO()
  session = chat_lib.Chat(model, max_new_tokens=6)
  assert session.run(lambda _: next(lines), out) == 0
  first = model.generate([image], [QUESTION], max_new_tokens=6)[0]
  turn = f"<image>\n{QUESTION}"
  second = model.generate([[image]], ["is the circle red"], max_new_tokens=6, history=[(turn, first)])[0]
  text = out.getvalue()
  assert f"assistant> {first}\n" in text and f"assistant> {second}\n" in text
  assert "error: image file not found: /nonexistent.png" in text and "(new conversation)" in text
  assert session.history == [] and session.images == []


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k: must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--max-new-tokens", "32"], "exceed the model's context of 40"),
    (["--image", "BAD"], "cannot read image"),
  ],
)
def test_bad_generate_input_is_one_line(checkpoint, flags, message, capsys):
  bad = os.path.join(checkpoint["dir"], "config.json")  # a file that is not an image
  flags = [bad if f == "BAD" else f for f in flags]
  image = [] if "--image" in flags else ["--image", checkpoint["images"][0]]
  assert cli.main(["generate", "--checkpoint", checkpoint["dir"], "--prompt", QUESTION, *image, *flags]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and "Traceback" not in err
