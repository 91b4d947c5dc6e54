"""Evaluation: metrics on hand-computed cases, eval examples from LLaVA records, the runner
(batched and sorted == one at a time, input order kept), periodic evals from config.evals, the
`vlm-jax eval` command, and the lmms-eval model class (== our generate and log-likelihoods)."""

import json
import os

import jax
import numpy as np
import PIL.Image
import pytest

import vlm_jax
import helpers
from processes import cli_here
from test_cli import assert_one_line_error
from vlm_jax import api
from vlm_jax import config as config_lib
from vlm_jax import build as build_lib
from vlm_jax import parallel
from vlm_jax.data import shapes, sources, templates
from vlm_jax.data.packing import collate_text
from vlm_jax.data.pipeline import device_batch
from vlm_jax.data.prepare import Prepared
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.eval import examples as examples_lib
from vlm_jax.eval import metrics
from vlm_jax.eval.metrics import Reference
from vlm_jax.eval.runner import Evaluator

# --- Metrics on hand-computed cases ------------------------------------------------------------


@pytest.mark.parametrize(
  "text,normalised",
  [
    ("Two", "2"),
    ("two dogs!", "2 dogs"),
    ("the cat.", "cat"),
    ("A dog", "dog"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("Yes.", "yes"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("t-shirt", "t shirt"),
    ("red, blue", "red blue"),
    ("  none\n", "0"),
    ("(left)", "left"),
  ],
)
def test_vqa_normalisation(text, normalised):
  assert metrics.normalize_vqa(text) == normalised


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out(matches, expected):
  """k of 10 annotators: the k subsets without a matching annotator see k-1 matches, the others k."""
  answers = ["two"] * matches + ["three"] * (10 - matches)
  assert metrics.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_single_reference_and_exact_match():
  assert metrics.vqa_accuracy("The Cat", ["cat"]) == 1.0
  assert metrics.vqa_accuracy("dog", ["cat"]) == 0.0
  assert metrics.exact_match("Two.", ["2", "3"]) == 1.0
  assert metrics.exact_match("two cats", ["2"]) == 0.0


@pytest.mark.parametrize(
  "text,letter",
  [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("b) cat", "B"),
    ("(C)", "C"),
    ("C. bird", "C"),
    ("Answer: A", "A"),
    ("cat", "B"),
    ("A cat.", "B"),
    ("I think it is C", "C"),
    ("the answer is a cat", "B"),
    ("E", None),
    ("Either (A) or (B)", None),
    ("a fish", None),
    ("", None),
  ],
)
def test_choice_letters(text, letter):
  assert metrics.choice_letter(text, ("dog", "cat", "bird")) == letter


def test_choice_accuracy_scores_invalid_as_wrong():
  ref = Reference(("B",), ("dog", "cat", "bird"))
  preds = ["The answer is (B).", "cat", "A", "no idea"]
  scores = [metrics.METRICS["mc"].score(p, ref) for p in preds]
  assert scores == [1.0, 1.0, 0.0, 0.0]
  assert metrics.METRICS["mc"].summary(preds, [ref] * 4, scores) == {"accuracy": 0.5, "invalid": 0.25}
  assert metrics.choice_accuracy("B", Reference(("cat",), ("dog", "cat"))) == 1.0  # gold given as the text


def test_pope_confusion_matrix():
  """TP 3, FP 1, TN 4, FN 2 -> accuracy 0.7, precision 0.75, recall 0.6, F1 2/3, yes-ratio 0.4."""
  gold = ["yes"] * 5 + ["no"] * 5
  preds = (
    ["Yes, there is."] * 3
    + ["No, there is not."] * 2
    + ["Yes."]
    + ["There is no such thing."] * 2
    + ["no", "It is not there."]
  )
  refs = [Reference((g,)) for g in gold]
  m = metrics.METRICS["pope"]
  scores = [m.score(p, r) for p, r in zip(preds, refs)]
  out = m.summary(preds, refs, scores)
  assert out == pytest.approx({"accuracy": 0.7, "precision": 0.75, "recall": 0.6, "f1": 2 / 3, "yes_ratio": 0.4})


def test_auto_metric_follows_the_samples():
  pick = lambda refs, spec="llava:x.jsonl": metrics.pick(refs, spec)[0]
  assert pick([Reference(("a",), ("a", "b"))]) == "mc"
  assert pick([Reference(("Yes",)), Reference(("no",))]) == "pope"
  assert pick([Reference(("2",) * 10), Reference(("cat",))]) == "vqa"
  assert pick([Reference(("cat",))]) == "exact"
  assert pick([Reference(("red",))], "shapes:test") == "shapes"


# --- Eval examples from samples -----------------------------------------------------------------


def test_prompt_is_the_conversation_up_to_the_last_answer():
  turns = [("user", "<image>\nWhat color?"), ("assistant", "red"), ("user", "And the shape?"), ("assistant", "circle")]
  e = examples_lib.from_sample(sources.Sample("k", turns, ["im.png"], category="x"), 3)
  assert (e.index, e.key, e.prompt, e.history) == (3, "k", "And the shape?", (("<image>\nWhat color?", "red"),))
  assert e.reference.answers == ("circle",) and e.turns == tuple(turns) and e.category == "x"
  # "answers" replace the last turn as the reference; without a last answer, no loss row.
  e = examples_lib.from_sample(sources.Sample("k", turns[:3], [], answers=["circle", "ball"]), 0)
  assert e.reference.answers == ("circle", "ball") and e.turns == () and e.prompt == "And the shape?"
  with pytest.raises(UserError, match="sample 7 .*no reference answer"):
    examples_lib.from_sample(sources.Sample("k", turns[:3], []), 7)


def test_choices_are_listed_when_the_question_does_not():
  s = sources.Sample("k", [("user", "Which animal?")], [], answers=["B"], choices=["dog", "cat"])
  e = examples_lib.from_sample(s, 0)
  assert e.prompt == "Which animal?\nA. dog\nB. cat\n" + examples_lib.CHOICE_INSTRUCTION
  listed = "Which animal?\nA. dog\nB. cat"
  s = sources.Sample("k", [("user", listed)], [], answers=["B"], choices=["dog", "cat"])
  assert examples_lib.from_sample(s, 0).prompt == listed


def test_llava_records_carry_answers_choices_and_category():
  record = {
    "id": 5,
    "conversations": [{"from": "human", "value": "Q?"}],
    "answers": [{"answer": "yes"}, "no"],
    "options": ["a", "b"],
    "category": "adversarial",
  }
  s = sources.llava_sample(record, 0, "")
  assert (s.answers, s.choices, s.category) == (["yes", "no"], ["a", "b"], "adversarial")


# --- The runner on a model ----------------------------------------------------------------------

LONGER = (
  "Look at the image and answer the question below. {} Answer the question using a single word or phrase.",
  "{}",
  "Look at the image and answer the question below. {}",
)


WRONG = "nothing"  # the other annotators' answer: never a shapes answer


def write_eval_set(directory: str, n: int, kind: str = "vqa", *, seed: int = 0, varied: bool = True) -> str:
  """n LLaVA records over held-out shapes images with their questions (varied: in prompts of
  three lengths); kind: vqa (10 annotator answers, a varying number of them right), mc
  (choices), pope (yes/no, as a gpt turn)."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  rng = np.random.default_rng(seed)
  path = os.path.join(directory, f"{kind}.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      ex = shapes.make_example(seed, "test", i, 64)
      name = f"images/{i}.png"
      PIL.Image.fromarray(ex.image).save(os.path.join(directory, name))
      question = ex.turns[0][1].replace("<image>\n", "")
      if varied:
        question = LONGER[i % 3].format(question)
      record = {
        "id": f"q{i}",
        "image": name,
        "category": ex.kind,
        "conversations": [{"from": "human", "value": "<image>\n" + question}],
      }
      if kind == "vqa":
        right = int(rng.integers(0, 11))
        record["answers"] = [ex.answer] * right + [WRONG] * (10 - right)
      elif kind == "mc":
        options = sorted({ex.answer, "blue", "square", "two"})
        record.update(choices=options, answers=[ex.answer])
      else:
        record["conversations"].append({"from": "gpt", "value": ["yes", "no"][i % 2]})
      f.write(json.dumps(record) + "\n")
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A shapes checkpoint trained for a few steps (its answers are not all the same)."""
  d = str(tmp_path_factory.mktemp("run"))
  cfg = helpers.tiny_config(
    {
      "mesh.data": -1,
      "train.steps": 30,
      "train.lr": 3e-3,
      "train.batch_size": 16,
      "data.seq_len": 64,
      "train.checkpoint_every": 30,
      "train.eval_every": 1000,
      "train.eval_examples": 8,
      "train.eval_batch_size": 8,
    }
  )
  api.train(cfg, d)
  return d


@pytest.fixture(scope="module")
def model(workdir):
  return vlm_jax.load(workdir)


def test_batched_sorted_eval_equals_one_at_a_time_in_input_order(model, tmp_path):
  path = write_eval_set(str(tmp_path), 12)
  ev = Evaluator(model.run, model.tokenizer, f"llava:{path}", batch_size=8)
  assert ev.metric == "vqa" and ev.order != sorted(ev.order)  # batches really are reordered
  result = ev(model.params)
  assert [r["index"] for r in result.records] == list(range(12))
  for r, e in zip(result.records, ev.examples):
    image = np.asarray(PIL.Image.open(e.images[0]))
    alone = model.generate([image], [e.prompt], max_new_tokens=ev.max_new_tokens)[0]
    assert r["prediction"] == alone, r
    assert r["score"] == metrics.vqa_accuracy(alone, r["answers"])
  assert result.metrics["accuracy"] == pytest.approx(np.mean([r["score"] for r in result.records]))
  assert result.metrics["examples"] == 12 and "loss" not in result.metrics  # no answer turns to score


def test_eval_loss_is_the_answer_tokens_loss(model, tmp_path):
  """The loss over a pope set (answers as turns) equals the one-example losses, token-weighted."""
  path = write_eval_set(str(tmp_path), 6, "pope")
  ev = Evaluator(model.run, model.tokenizer, f"llava:{path}", batch_size=8)
  result = ev(model.params)
  assert result.metrics["metric"] == "pope" and set(result.metrics) >= {"precision", "recall", "f1", "yes_ratio"}
  examples, total, count = ev.examples, 0.0, 0
  for e in examples:
    ev.examples, ev.order = [e], [0]
    tokens = templates.encode_conversation(e.turns, model.tokenizer, model.image_tokens).loss_mask[1:].sum()
    total, count = total + ev(model.params).metrics["loss"] * tokens, count + tokens
  assert result.metrics["loss"] == pytest.approx(total / count, rel=1e-5)


def test_metric_errors_name_the_sample(model, tmp_path):
  path = write_eval_set(str(tmp_path), 3, "vqa")
  with pytest.raises(UserError, match="sample 0 .*mc needs 'choices'"):
    Evaluator(model.run, model.tokenizer, f"llava:{path}", metric="mc")
  with pytest.raises(UserError, match="metric 'bleu': unknown"):
    Evaluator(model.run, model.tokenizer, f"llava:{path}", metric="bleu")


# --- Periodic evals -----------------------------------------------------------------------------


def test_periodic_evals_from_config(tmp_path):
  path = write_eval_set(str(tmp_path / "data"), 8, "mc")
  cfg = helpers.tiny_config(
    {
      "mesh.data": -1,
      "data.seq_len": 64,
      "train.steps": 4,
      "train.eval_every": 2,
      "train.eval_examples": 8,
      "train.eval_batch_size": 8,
      "train.checkpoint_every": 4,
    }
  )
  cfg.evals.mc = config_lib.eval_entry(f"llava:{path}", "mc", every=3)
  api.train(cfg, str(tmp_path / "run"))
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  steps = lambda key: [l["step"] for l in lines if key in l]
  assert steps("eval/shapes_test/accuracy") == [2, 4] and steps("eval/shapes_test/loss") == [2, 4]
  assert steps("eval/mc/accuracy") == [3, 4] and steps("eval/mc/invalid") == [3, 4]
  assert any(k.startswith("eval/mc/accuracy/") for l in lines for k in l)  # per category (question kind)


def test_eval_config_fields():
  c = config_lib.base()
  config_lib.apply_overrides(c, {"evals.pope.data": "llava:pope.jsonl", "evals.pope.every": "50"})
  assert dict(c.evals.pope) == dict(data="llava:pope.jsonl", metric="auto", every=50, max_examples=0)
  c.train.eval_examples = 64
  assert config_lib.eval_entries(c)["pope"].max_examples == 64
  with pytest.raises(UserError, match="evals.pope.metrc"):
    config_lib.apply_overrides(c, {"evals.pope.metrc": "vqa"})
  bad = config_lib.from_json(config_lib.to_json(c))
  bad.evals.pope.extra = 1
  with pytest.raises(UserError, match="evals.pope.extra: unknown config field"):
    config_lib.validate(bad)
  c.evals.few = {"data": "shapes:test", "metric": "shapes"}  # a config file may give only some fields
  config_lib.validate(c)  # takes them as they are, changing nothing
  assert dict(c.evals.few) == dict(data="shapes:test", metric="shapes")
  config_lib.complete_evals(c)  # as load_file, apply_overrides and from_json do
  assert dict(c.evals.few) == dict(data="shapes:test", metric="shapes", every=0, max_examples=0)
  assert config_lib.from_json(config_lib.to_json(c)).evals.pope.every == 50


# --- The command --------------------------------------------------------------------------------


def test_cli_score_is_the_mean_of_the_predictions(workdir, tmp_path, capsys):
  path = write_eval_set(str(tmp_path), 10)
  predictions = tmp_path / "pred.jsonl"
  r = cli_here(
    capsys,
    "eval",
    "--checkpoint",
    workdir,
    "--data",
    f"llava:{path}",
    "--predictions",
    str(predictions),
    "--batch-size",
    "4",
    "--json",
  )
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert (
    "metric: vqa (samples carry 'answers' lists)" in r.stderr and "examples/s" in r.stderr
  )  # the auto choice and the progress bar
  lines = [json.loads(l) for l in open(predictions)]
  assert [l["index"] for l in lines] == list(range(10))
  assert set(lines[0]) == {"index", "id", "prompt", "prediction", "answers", "score"}
  recomputed = [metrics.vqa_accuracy(l["prediction"], l["answers"]) for l in lines]
  assert [l["score"] for l in lines] == recomputed
  assert out["examples"] == 10 and out["metric"] == "vqa"
  assert out["accuracy"] == pytest.approx(np.mean(recomputed))


def test_cli_eval_errors(workdir, tmp_path, capsys):
  no_refs = tmp_path / "norefs.jsonl"
  no_refs.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "Hi?"}]}) + "\n")
  assert_one_line_error(
    cli_here(capsys, "eval", "--checkpoint", workdir, "--data", f"llava:{no_refs}"), "sample 0", "no reference answer"
  )
  assert_one_line_error(
    cli_here(capsys, "eval", "--checkpoint", workdir, "--data", "shapes:test", "--metric", "bleu"), "--metric", "bleu"
  )
  assert_one_line_error(
    cli_here(capsys, "eval", "--checkpoint", workdir, "--data", "shapes:test", "--max-examples", "0"), "--max-examples"
  )


# --- lmms-eval ----------------------------------------------------------------------------------


def test_lmms_eval_model_answers_requests_like_ours(workdir, model):
  from lmms_eval.api.instance import Instance
  from lmms_eval.models import get_model
  from vlm_jax.lmms import VlmJax

  assert get_model("vlm_jax") is VlmJax  # registered through our entry point
  lm = VlmJax(checkpoint=workdir, batch_size=2)
  docs = {i: {"image": shapes.make_example(0, "test", i, 64).image} for i in range(3)}
  lm.task_dict = {"t": {"test": docs}}
  visual = lambda doc: [doc["image"]]
  questions = ["What color is the circle?", "How many shapes are there?", "What shape is red?"]
  meta = lambda i: {"task": "t", "doc_id": i, "repeats": 1}
  gen = [
    Instance("generate_until", (q, {"until": ["\n"], "max_new_tokens": 6}, visual, i, "t", "test"), i, meta(i))
    for i, q in enumerate(questions)
  ]
  ours = model.generate([[docs[i]["image"]] for i in range(3)], questions, max_new_tokens=6)
  assert lm.generate_until(gen) == [o.split("\n")[0] for o in ours]

  continuations = [ours[0] or "red", "three", "blue"]
  ll = [
    Instance("loglikelihood", (q, c, visual, i, "t", "test"), i, meta(i))
    for i, (q, c) in enumerate(zip(questions, continuations))
  ]
  got = lm.loglikelihood(ll)
  expected = model.loglikelihood([[docs[i]["image"]] for i in range(3)], questions, continuations)
  assert got == expected
  # Independently: minus the training loss of the same answer turn, summed over its tokens.
  for i, (q, c) in enumerate(zip(questions, continuations)):
    enc = model.inputs.encode_answered(q, c, [docs[i]["image"]])
    rows = [[Prepared("x", enc.tokens, enc.loss_mask, np.zeros((0, 1, 1, 3)))]]
    rows += [[]] * (parallel.batch_divisor(model.run.mesh) - 1)
    batch = dict(
      device_batch(collate_text(rows, len(enc.tokens), model.tokenizer.pad_id)),
      images=model.pixels([[docs[i]["image"]]] + [None] * (len(rows) - 1)),
    )
    out = jax.device_get(model.run.eval_step(model.params, batch))
    assert got[i][0] == pytest.approx(-float(out["loss_sum"]), rel=1e-4, abs=1e-4)
  # is_greedy: the model's own greedy answer (with its EOS) is, when its text encodes back to its ids.
  answers = model.generate_ids([[docs[i]["image"]] for i in range(3)], questions, 16)
  i = next(i for i, ids in enumerate(answers) if ids)
  ids, answer = answers[i], model.tokenizer.decode(answers[i]).strip()
  ((_, greedy),) = model.loglikelihood([[docs[i]["image"]]], [questions[i]], [answer])
  enc = model.inputs.encode_answered(questions[i], answer, [docs[i]["image"]])
  round_trip = enc.tokens[enc.loss_mask].tolist() == ids + [model.tokenizer.eos_id]
  assert greedy == (round_trip and len(ids) < 16)
  ((_, wrong),) = model.loglikelihood([[docs[i]["image"]]], [questions[i]], [answer + " purple"])
  assert not wrong


def test_anyres_eval_batched_equals_one_at_a_time():
  """AnyRes: each image its own tile plan; batched answers and loss == each example alone."""
  tok = Tokenizer.load("shapes")
  cfg = helpers.tiny_config(
    {
      "model.vision.image_size": 32,
      "model.vision.patch_size": 16,
      "mesh.data": -1,
      "model.anyres.enabled": True,
      "model.anyres.grid_pinpoints": "(1x1),...,(1x6)",
      "data.seq_len": 96,
      "train.eval_batch_size": 8,
    }
  )
  build_lib.resolve_model_config(cfg, tok.vocab_size)
  run = build_lib.build(cfg, parallel.make_mesh(cfg.mesh), tok.image_id)
  params = run.init_params(jax.random.key(1))
  ev = Evaluator(run, tok, "shapes:wide_test", max_examples=6)
  batched = ev(params)
  examples = ev.examples
  total = count = 0.0
  for e in examples:
    ev.examples, ev.order = [e], [0]
    alone = ev(params)
    assert alone.records[0]["prediction"] == batched.records[e.index]["prediction"]
    tokens = templates.encode_conversation(e.turns, tok, [ev.inputs.image_tokens_for(e.images[0])]).loss_mask[1:].sum()
    total, count = total + alone.metrics["loss"] * tokens, count + tokens
  assert batched.metrics["loss"] == pytest.approx(total / count, rel=1e-5)
  assert len({ev.inputs.image_tokens_for(e.images[0]) for e in examples}) > 1  # plans differ by image
