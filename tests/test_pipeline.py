"""The grain pipeline: layout, packing, resume, shards, mixtures, bad samples, multi-image rows."""

import collections
import json
import logging

import jax
import numpy as np
import PIL.Image
import pytest

from helpers import data_config, per_sample_loss, tiny_config
from vlm_jax.data import IMAGE, images, llava_fixture, shapes, sources
from vlm_jax.data.packing import collate_text, square_images
from vlm_jax.data.pipeline import Batches, EpochOrder, device_batch
from vlm_jax.data.prepare import Prepared, Skipped
from vlm_jax.data.templates import encode_conversation
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.models.vlm import VLM, image_tokens as model_image_tokens

SIZE, IMAGE_TOKENS, SEED, N = 16, 4, 5, 40


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load("shapes")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  return llava_fixture.write(str(tmp_path_factory.mktemp("llava")), N, image_size=SIZE)


def _batches(tok, spec, *, seq_len=128, batch=4, process_index=0, process_count=1, **data):
  config = data_config(spec, seq_len=seq_len, batch=batch, seed=SEED, **{"threads": 2, **data})
  return Batches(
    config,
    tok,
    IMAGE_TOKENS,
    preprocessing=images.Preprocessing(SIZE),
    process_index=process_index,
    process_count=process_count,
  )


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _keys(batches):
  return [k for b in batches for row in b["keys"] for k in row]


def test_unpacked_rows_are_the_samples_encoded(tok):
  b = _take(_batches(tok, "shapes", batch=4), 1)[0]
  assert {k: v.shape for k, v in device_batch(b).items()} == {
    "images": (4, 1, SIZE, SIZE, 3),
    "tokens": (4, 128),
    "targets": (4, 128),
    "loss_mask": (4, 128),
    "segment_ids": (4, 128),
    "positions": (4, 128),
  }
  assert b["image_mask"].shape == (4, 1)  # which slots hold an image: for the host, not sent
  for r, (key,) in enumerate(b["keys"]):
    ex = shapes.make_example(SEED, "train", int(key), SIZE)
    enc = encode_conversation(ex.turns, tok, IMAGE_TOKENS)
    n = len(enc.tokens)
    np.testing.assert_array_equal(b["images"][r, 0], images.Preprocessing(SIZE)(ex.image))
    assert b["tokens"][r, :n].tolist() == enc.tokens.tolist() and np.all(b["tokens"][r, n:] == tok.pad_id)
    assert b["targets"][r, : n - 1].tolist() == enc.tokens[1:].tolist()
    assert b["segment_ids"][r].tolist() == [1] * n + [0] * (128 - n)
    assert b["positions"][r].tolist() == list(range(n)) + [0] * (128 - n)
    assert b["loss_mask"][r, : n - 1].tolist() == enc.loss_mask[1:].tolist()
    assert b["loss_mask"][r, n - 1 :].sum() == 0


def test_packed_rows(tok, llava):
  batches = _take(_batches(tok, f"llava:{llava}", seq_len=160, pack=True, max_images=4), 4)
  for b in batches:
    assert max(len(row) for row in b["keys"]) >= 2  # several samples share a row
    for r, row in enumerate(b["keys"]):
      seg = b["segment_ids"][r]
      assert sorted(set(seg.tolist()) - {0}) == list(range(1, len(row) + 1))
      for s in range(1, len(row) + 1):
        where = np.flatnonzero(seg == s)
        assert np.all(np.diff(where) == 1) and b["positions"][r, where].tolist() == list(range(len(where)))
        assert b["loss_mask"][r, where[-1]] == 0  # no target across samples
      n_images = (b["tokens"][r] == tok.image_id).sum() // IMAGE_TOKENS
      assert b["image_mask"][r].tolist() == [1.0] * n_images + [0.0] * (4 - n_images)


def test_packed_loss_equals_unpacked(tok):
  cfg = tiny_config({"model.llm.vocab_size": tok.vocab_size, "model.vision.image_size": SIZE})
  model = VLM(cfg.model, tok.image_id)
  n_image = model_image_tokens(cfg.model)
  config = data_config("shapes", seq_len=192, batch=2, seed=SEED, pack=True, max_images=3, threads=0, prefetch=0)
  it = Batches(config, tok, n_image, preprocessing=images.Preprocessing(SIZE))
  packed = next(it)
  assert max(len(row) for row in packed["keys"]) >= 2
  samples = [it.prepare((0, int(k))) for row in packed["keys"] for k in row]
  rows = [[s] for s in samples]
  unpacked = {**square_images(rows, 3, (SIZE, SIZE)), **collate_text(rows, 192, tok.pad_id)}
  params = model.init(jax.random.key(0), *(unpacked[k][:1] for k in ("tokens", "images", "positions", "segment_ids")))[
    "params"
  ]
  a, b = per_sample_loss(model, params, packed), per_sample_loss(model, params, unpacked)
  assert a.keys() == b.keys()
  np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_the_samples_of_an_unbroken_run(tok, llava, workers):
  kwargs = dict(seq_len=160, pack=True, max_images=4, workers=workers)
  k = 5
  unbroken = _take(_batches(tok, f"llava:{llava}", **kwargs), 2 * k)
  first = _batches(tok, f"llava:{llava}", **kwargs)
  _take(first, k)
  state = json.loads(json.dumps(first.get_state()))
  assert sum(state["skipped"].values()) > 0  # the stream so far skipped some broken samples
  resumed = _batches(tok, f"llava:{llava}", **kwargs)
  resumed.set_state(state)
  rest = _take(resumed, k)
  assert [b["keys"] for b in rest] == [b["keys"] for b in unbroken[k:]]
  for a, b in zip(rest, unbroken[k:]):
    for name in device_batch(a):
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  with pytest.raises(UserError, match="data iterator state"):
    resumed.set_state({"skipped": {}})


def _epoch(size: int, epoch: int, processes: int) -> list[tuple[int, int]]:
  """(process, sample index) of each global position of one epoch, read by `processes` processes."""
  return [
    (g % processes, EpochOrder(0, size, SEED, g % processes, processes)[g // processes][1])
    for g in range(epoch * size, (epoch + 1) * size)
  ]


def test_processes_read_disjoint_shards_that_cover_the_set():
  for epoch in range(3):
    read = _epoch(23, epoch, 2)
    assert sorted(i for _, i in read) == list(range(23))  # each sample once per epoch
    assert {p for p, _ in read} == {0, 1}
  assert _epoch(23, 0, 2) != _epoch(23, 1, 2)  # each epoch is shuffled anew


@pytest.mark.parametrize("processes", [2, 3, 8])
def test_the_global_stream_is_the_same_on_any_process_count(processes):
  """What lets a run continue on another process count: global position g is the same sample."""
  for epoch in range(3):
    assert [i for _, i in _epoch(23, epoch, processes)] == [i for _, i in _epoch(23, epoch, 1)]


def test_two_processes_read_one_epoch_between_them(tok, tmp_path):
  path = llava_fixture.write(str(tmp_path), 21, image_size=SIZE, broken=False)
  ids = [r["id"] for r in json.load(open(path))]
  keys = [
    _keys(_take(_batches(tok, f"llava:{path}", batch=2, process_index=p, process_count=2), len(range(p, 21, 2))))
    for p in range(2)
  ]
  assert [len(k) for k in keys] == [11, 10]
  assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(ids)


def _global_batches(tok, spec, processes: int, k: int, states=None):
  """k global batches (sorted keys of each) read by `processes` processes, their states, and
  the messages of continuing from `states`."""
  rows, new_states, messages = [], [], []
  for p in range(processes):
    it = _batches(tok, spec, batch=4, process_index=p, process_count=processes)
    messages.append(it.continue_from(states, p) if states else None)
    rows.append([next(it)["keys"] for _ in range(k)])
    new_states.append(it.get_state())
    it.close()
  return (
    [sorted(key for p in range(processes) for row in rows[p][i] for key in row) for i in range(k)],
    new_states,
    messages,
  )


def test_a_stream_continues_on_another_process_count(tok, tmp_path):
  """2 processes read 3 batches; 1 or 4 processes go on with the unbroken stream's batches 4-6
  (21 samples, 4 a batch: across an epoch's end)."""
  spec = f"llava:{llava_fixture.write(str(tmp_path), 21, image_size=SIZE, broken=False)}"
  unbroken, _, _ = _global_batches(tok, spec, 1, 6)
  first, states, _ = _global_batches(tok, spec, 2, 3)
  assert first == unbroken[:3]
  for processes in (1, 2, 4):
    rest, _, messages = _global_batches(tok, spec, processes, 3, states)
    assert rest == unbroken[3:], processes
    assert messages == (
      [None] * 2
      if processes == 2
      else ["data: 2 processes' positions continued on %d: from global sample 12 (exact)" % processes] * processes
    )


def _without_positions(state):
  """A state as vlm-jax wrote it before it kept stream positions (grain's state and the counts)."""
  if isinstance(state, dict):
    return {k: _without_positions(v) for k, v in state.items() if k != "position"}
  return state


@pytest.mark.parametrize("pack", [False, True])
def test_a_state_written_before_positions_were_kept_resumes_exactly(tok, tmp_path, pack):
  """Checkpoints of the previous layout: the same process count resumes where it was; another one is
  refused in one line (that layout holds no position of ours)."""
  spec = f"llava:{llava_fixture.write(str(tmp_path), 21, image_size=SIZE, broken=False)}"
  unbroken = _keys(_take(_batches(tok, spec, pack=pack), 5))
  it = _batches(tok, spec, pack=pack)
  first = _keys([next(it) for _ in range(2)])
  state = it.get_state()
  it.close()
  old = _without_positions(state)
  assert "position" in json.dumps(state) and "position" not in json.dumps(old)
  resumed = _batches(tok, spec, pack=pack)
  assert resumed.continue_from([old], 0) is None
  assert first + _keys(_take(resumed, 3)) == unbroken
  with pytest.raises(UserError, match="no stream position to move from 1 to 2 processes"):
    _batches(tok, spec, pack=pack, process_index=0, process_count=2).continue_from([old], 0)


def test_one_epoch_sees_every_good_sample_once(tok, llava):
  records = json.load(open(llava))
  good = [r["id"] for r in records if r["id"] not in llava_fixture.BROKEN]
  it = _batches(tok, f"llava:{llava}", batch=1, seq_len=160)
  keys = _keys(_take(it, len(good)))
  assert sorted(keys) == sorted(good)


def test_bad_samples_are_skipped_counted_and_logged_once(tok, llava, caplog):
  records = json.load(open(llava))
  it = _batches(tok, f"llava:{llava}", batch=1, seq_len=160)
  prepare = it.prepare
  for index, record in enumerate(records):
    out = prepare((0, index))
    if record["id"] in llava_fixture.BROKEN:
      assert isinstance(out, Skipped), record["id"]
      assert out.reason == llava_fixture.BROKEN[record["id"]], out
      assert out.message.startswith(f"llava:{llava} sample {index}: ")
    else:
      assert isinstance(out, Prepared) and out.key == record["id"]
      assert len(out.images) == ("image" in record)
  good = len(records) - len(llava_fixture.BROKEN)
  with caplog.at_level(logging.WARNING):
    _take(it, 2 * good)  # two epochs: every broken sample met twice
  expected = collections.Counter(llava_fixture.BROKEN.values())
  assert it.skipped == {reason: 2 * n for reason, n in expected.items()}
  assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == len(expected)
  with pytest.raises(UserError, match=rf"llava:{llava} sample \d+: .*data.strict=True"):
    _take(_batches(tok, f"llava:{llava}", batch=1, seq_len=160, strict=True), good)


def test_skipping_everything_stops(tok):
  with pytest.raises(UserError, match="in a row skipped"):
    next(_batches(tok, "shapes", seq_len=8))


def test_jsonl_with_a_broken_line(tok, tmp_path):
  path = llava_fixture.write(str(tmp_path), 6, image_size=SIZE, broken=False, jsonl=True)
  with open(path, "a") as f:
    f.write("{not json\n")
  source = sources.open_source(f"llava:{path}", sources.Options())
  assert len(source) == 7
  it = _batches(tok, f"llava:{path}", batch=1)
  assert isinstance(it.prepare((0, 6)), Skipped) and it.prepare((0, 6)).reason == "format"
  assert sorted(_keys(_take(it, 6))) == sorted(json.loads(l)["id"] for l in open(path).read().splitlines()[:6])


def test_mixture_follows_the_weights(tok, llava):
  it = _batches(tok, f"shapes=3,llava:{llava}=1", batch=8, seq_len=160)
  keys = _keys(_take(it, 40))
  from_shapes = sum(k.isdigit() for k in keys) / len(keys)
  assert abs(from_shapes - 0.75) < 0.05


@pytest.mark.parametrize(
  "spec, message",
  [
    ("coco", "unknown source"),
    ("shapes:val", "unknown split"),
    ("llava:/nope.json", "file not found"),
    ("shapes=x", "not a number"),
    ("shapes=0", "must be positive"),
    ("", "no source"),
  ],
)
def test_spec_errors(spec, message):
  with pytest.raises(UserError, match=message):
    sources.open_mixture(spec, sources.Options())


def test_unknown_template_fails_at_construction(tok):
  with pytest.raises(UserError, match="unknown chat template"):
    _batches(tok, "shapes", template="nope")


def _two_image_set(tmp_path) -> tuple[str, list[np.ndarray]]:
  pixels = [np.full((SIZE, SIZE, 3), v, np.uint8) for v in (30, 220)]
  for i, p in enumerate(pixels):
    PIL.Image.fromarray(p).save(tmp_path / f"{i}.png")
  record = {
    "id": "two",
    "image": ["0.png", "1.png"],
    "conversations": [{"from": "human", "value": f"Left {IMAGE} right {IMAGE} same?"}, {"from": "gpt", "value": "no"}],
  }
  path = tmp_path / "two.json"
  path.write_text(json.dumps([record]))
  return str(path), pixels


def test_multi_image_sample(tok, tmp_path):
  path, pixels = _two_image_set(tmp_path)
  b = _take(_batches(tok, f"llava:{path}", batch=1, max_images=3), 1)[0]
  assert b["image_mask"].tolist() == [[1.0, 1.0, 0.0]]
  for i, p in enumerate(pixels):
    np.testing.assert_array_equal(b["images"][0, i], images.Preprocessing(SIZE)(p))
  assert (b["tokens"] == tok.image_id).sum() == 2 * IMAGE_TOKENS
  with pytest.raises(UserError, match="2 image tiles > data.max_images 1"):
    _take(_batches(tok, f"llava:{path}", batch=1, strict=True), 1)


@pytest.mark.parametrize("resize", ["squash", "shortest_edge_crop", "pad_square"])
def test_training_images_follow_the_configs_resize_mode(tok, tmp_path, resize):
  """A non-square photo is resized as config.data says (the checkpoint's processor after import)."""
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (18, 50, 3), dtype=np.uint8)
  PIL.Image.fromarray(photo).save(tmp_path / "wide.png")
  (tmp_path / "one.json").write_text(
    json.dumps(
      [
        {
          "id": "w",
          "image": "wide.png",
          "conversations": [{"from": "human", "value": f"{IMAGE}\nWhat is it?"}, {"from": "gpt", "value": "red"}],
        }
      ]
    )
  )
  cfg = tiny_config(
    {
      "data.image_resize": resize,
      "data.image_short_side": 20,
      "data.image_fill": (9, 99, 199),
      "data.sources": f"llava:{tmp_path / 'one.json'}",
      "data.seq_len": 64,
      "train.batch_size": 1,
    }
  )
  cfg.data.update(dict(threads=0, prefetch=0))
  b = next(Batches(cfg, tok, IMAGE_TOKENS))
  pre = images.Preprocessing(SIZE, resize=resize, short_side=20, fill=(9, 99, 199))
  np.testing.assert_array_equal(b["images"][0, 0], pre.pixels(photo))  # uint8: normalised on device
  # The modes differ on this photo: a test of one of them cannot pass for another.
  others = [
    images.Preprocessing(SIZE, resize=r, short_side=20, fill=(9, 99, 199)).pixels(photo)
    for r in ("squash", "shortest_edge_crop", "pad_square")
    if r != resize
  ]
  assert all(np.abs(o.astype(int) - b["images"][0, 0]).max() > 10 for o in others)


def test_model_writes_each_image_into_its_own_placeholders(tok, tmp_path):
  cfg = tiny_config({"model.llm.vocab_size": tok.vocab_size, "model.vision.image_size": SIZE})
  model = VLM(cfg.model, tok.image_id)
  path, _ = _two_image_set(tmp_path)
  n_image = model_image_tokens(cfg.model)
  config = data_config(f"llava:{path}", seq_len=64, batch=1, seed=SEED, max_images=2, threads=0, prefetch=0)
  b = _take(Batches(config, tok, n_image, preprocessing=images.Preprocessing(SIZE)), 1)[0]
  params = model.init(jax.random.key(0), b["tokens"], b["images"], b["positions"], b["segment_ids"])["params"]
  embeds = model.apply({"params": params}, b["tokens"], b["images"], method=VLM.embed)
  where = np.flatnonzero(b["tokens"][0] == tok.image_id)
  for i in range(2):
    alone = model.apply({"params": params}, b["images"][:, i : i + 1], method=VLM.encode_images)
    np.testing.assert_allclose(embeds[0, where[i * n_image : (i + 1) * n_image]], alone[0], rtol=1e-5, atol=1e-6)
