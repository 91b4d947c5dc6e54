"""Answer metrics as the benchmarks define them, one registry entry each (METRICS).

- vqa: VQAv2 accuracy. Answers are normalised as the official evaluation does (vqaEval.py:
  punctuation, number words -> digits, articles dropped, contractions restored); an answer
  scores min(#annotators who gave it / 3, 1), averaged over the leave-one-out subsets of the
  annotators (so 2 of 10 -> 0.6, 3 of 10 -> 0.9). A single reference scores as exact match.
- exact: exact match with any reference after that normalisation.
- mc: multiple-choice letter accuracy; the letter is read from free text ("The answer is (B).",
  "B", "b) cat", or the text of one choice); an answer with no readable letter is wrong.
- pope: yes/no hallucination probes scored as POPE's evaluation does (the first sentence; "no"
  or "not" in it -> no, else yes); accuracy, precision, recall and F1 of "yes", and yes-ratio.
- shapes: the built-in set's match (lowercase, punctuation dropped).

Pure Python. The VQA tables and rules are the official evaluation's, its period-rule typo
included, so that scores compare with published ones.
"""

import dataclasses
import re
import string
from typing import Callable, Sequence

from vlm_jax.data.shapes import answer_matches
from vlm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Reference:
  """What an answer is scored against: the accepted answers (VQA: one per annotator) and, for
  multiple choice, the choices in letter order (A, B, ...)."""

  answers: tuple[str, ...]
  choices: tuple[str, ...] = ()


# --- VQAv2 normalisation (github.com/GT-Vision-Lab/VQA, vqaEval.py) ------------------------------
CONTRACTIONS = {
  "aint": "ain't",
  "arent": "aren't",
  "cant": "can't",
  "couldve": "could've",
  "couldnt": "couldn't",
  "couldn'tve": "couldn't've",
  "couldnt've": "couldn't've",
  "didnt": "didn't",
  "doesnt": "doesn't",
  "dont": "don't",
  "hadnt": "hadn't",
  "hadnt've": "hadn't've",
  "hadn'tve": "hadn't've",
  "hasnt": "hasn't",
  "havent": "haven't",
  "hed": "he'd",
  "hed've": "he'd've",
  "he'dve": "he'd've",
  "hes": "he's",
  "howd": "how'd",
  "howll": "how'll",
  "hows": "how's",
  "Id've": "I'd've",
  "I'dve": "I'd've",
  "Im": "I'm",
  "Ive": "I've",
  "isnt": "isn't",
  "itd": "it'd",
  "itd've": "it'd've",
  "it'dve": "it'd've",
  "itll": "it'll",
  "let's": "let's",
  "maam": "ma'am",
  "mightnt": "mightn't",
  "mightnt've": "mightn't've",
  "mightn'tve": "mightn't've",
  "mightve": "might've",
  "mustnt": "mustn't",
  "mustve": "must've",
  "neednt": "needn't",
  "notve": "not've",
  "oclock": "o'clock",
  "oughtnt": "oughtn't",
  "ow's'at": "'ow's'at",
  "'ows'at": "'ow's'at",
  "'ow'sat": "'ow's'at",
  "shant": "shan't",
  "shed've": "she'd've",
  "she'dve": "she'd've",
  "she's": "she's",
  "shouldve": "should've",
  "shouldnt": "shouldn't",
  "shouldnt've": "shouldn't've",
  "shouldn'tve": "shouldn't've",
  "somebody'd": "somebodyd",
  "somebodyd've": "somebody'd've",
  "somebody'dve": "somebody'd've",
  "somebodyll": "somebody'll",
  "somebodys": "somebody's",
  "someoned": "someone'd",
  "someoned've": "someone'd've",
  "someone'dve": "someone'd've",
  "someonell": "someone'll",
  "someones": "someone's",
  "somethingd": "something'd",
  "somethingd've": "something'd've",
  "something'dve": "something'd've",
  "somethingll": "something'll",
  "thats": "that's",
  "thered": "there'd",
  "thered've": "there'd've",
  "there'dve": "there'd've",
  "therere": "there're",
  "theres": "there's",
  "theyd": "they'd",
  "theyd've": "they'd've",
  "they'dve": "they'd've",
  "theyll": "they'll",
  "theyre": "they're",
  "theyve": "they've",
  "twas": "'twas",
  "wasnt": "wasn't",
  "wed've": "we'd've",
  "we'dve": "we'd've",
  "weve": "we've",
  "werent": "weren't",
  "whatll": "what'll",
  "whatre": "what're",
  "whats": "what's",
  "whatve": "what've",
  "whens": "when's",
  "whered": "where'd",
  "wheres": "where's",
  "whereve": "where've",
  "whod": "who'd",
  "whod've": "who'd've",
  "who'dve": "who'd've",
  "wholl": "who'll",
  "whos": "who's",
  "whove": "who've",
  "whyll": "why'll",
  "whyre": "why're",
  "whys": "why's",
  "wont": "won't",
  "wouldve": "would've",
  "wouldnt": "wouldn't",
  "wouldnt've": "wouldn't've",
  "wouldn'tve": "wouldn't've",
  "yall": "y'all",
  "yall'll": "y'all'll",
  "y'allll": "y'all'll",
  "yall'd've": "y'all'd've",
  "y'alld've": "y'all'd've",
  "y'all'dve": "y'all'd've",
  "youd": "you'd",
  "youd've": "you'd've",
  "you'dve": "you'd've",
  "youll": "you'll",
  "youre": "you're",
  "youve": "you've",
}
NUMBERS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Verbatim, typo included: "(?!<=\d)" is a lookahead, so a period is kept only before a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
  out = text
  for p in PUNCTUATION:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
  words = [NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
  """The official VQAv2 answer normalisation: 'Two dogs!' -> '2 dogs', 'the cat.' -> 'cat'."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """min(#matches / 3, 1) averaged over the leave-one-out subsets of the annotators' answers."""
  pred = normalize_vqa(prediction)
  gts = [normalize_vqa(a) for a in answers]
  if len(gts) == 1:
    return float(pred == gts[0])
  matches = sum(g == pred for g in gts)
  # Leaving out annotator i removes one match when i gave the predicted answer.
  return sum(min((matches - (g == pred)) / 3, 1.0) for g in gts) / len(gts)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  pred = normalize_vqa(prediction)
  return float(any(pred == normalize_vqa(a) for a in answers))


# --- Multiple choice ------------------------------------------------------------------------------
LETTERS = string.ascii_uppercase
# The phrase in any case, the letter a capital (or in parentheses): "the answer is a cat" names no letter.
_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?:\(([A-Za-z])\)|([A-Z])\b)")
_LEADING = re.compile(r"^\(?([A-Za-z])(?:\s*[).:]|\)?$)(?:\s|$)")


def choice_letter(text: str, choices: Sequence[str]) -> str | None:
  """The letter an answer names (A for the first choice), or None. In order: a leading letter
  ("B", "(B)", "b) cat", "B. cat"), one after "answer is"/"option", one letter in parentheses,
  the whole text of a choice, one standalone capital, the text of exactly one choice inside the
  answer. Only the choices' letters count; two candidates of one kind name none."""
  valid = LETTERS[: len(choices)]
  text = text.strip()
  found = _LEADING.match(text)
  if found and found.group(1).upper() in valid:
    return found.group(1).upper()
  for m in _PHRASE.finditer(text):
    letter = (m.group(1) or m.group(2)).upper()
    if letter in valid:
      return letter
  letters = {m.upper() for m in re.findall(r"\(([A-Za-z])\)", text)} & set(valid)
  if len(letters) == 1:
    return letters.pop()
  norm = normalize_vqa(text)
  named = [LETTERS[i] for i, c in enumerate(choices) if normalize_vqa(c) == norm]
  if len(named) == 1:
    return named[0]
  # Standalone capitals; "A" and "I" before a lowercase word are an article and a pronoun.
  letters = {
    m.group(1)
    for m in re.finditer(r"\b([A-Z])\b", text)
    if not (m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end() :]))
  } & set(valid)
  if len(letters) == 1:
    return letters.pop()
  named = [
    LETTERS[i]
    for i, c in enumerate(choices)
    if normalize_vqa(c) and re.search(rf"\b{re.escape(normalize_vqa(c))}\b", norm)
  ]
  return named[0] if len(named) == 1 else None


def choice_accuracy(prediction: str, ref: Reference) -> float:
  gold = {choice_letter(a, ref.choices) for a in ref.answers} - {None}
  return float(choice_letter(prediction, ref.choices) in gold)


def _choice_summary(predictions: Sequence[str], refs: Sequence[Reference], scores: Sequence[float]) -> dict:
  invalid = sum(choice_letter(p, r.choices) is None for p, r in zip(predictions, refs))
  return {"accuracy": _mean(scores), "invalid": invalid / max(len(scores), 1)}


# --- POPE -----------------------------------------------------------------------------------------
def pope_answer(text: str) -> str:
  """POPE's reading of an answer (its eval script): the first sentence, "no"/"not" -> no, else yes."""
  first = text.split(".")[0] if "." in text else text
  words = first.replace(",", "").split(" ")
  return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def _pope_label(ref: Reference) -> str:
  return normalize_vqa(ref.answers[0])


def _pope_summary(predictions: Sequence[str], refs: Sequence[Reference], scores: Sequence[float]) -> dict:
  pred = [pope_answer(p) == "yes" for p in predictions]
  gold = [_pope_label(r) == "yes" for r in refs]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(g and not p for p, g in zip(pred, gold))
  precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
  return {
    "accuracy": _mean(scores),
    "precision": precision,
    "recall": recall,
    "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    "yes_ratio": sum(pred) / max(len(pred), 1),
  }


# --- The registry ---------------------------------------------------------------------------------
def _mean(scores: Sequence[float]) -> float:
  return sum(scores) / len(scores) if scores else 0.0


def _accuracy(predictions, refs, scores) -> dict:
  return {"accuracy": _mean(scores)}


@dataclasses.dataclass(frozen=True)
class Metric:
  score: Callable[[str, Reference], float]  # one answer -> its score in [0, 1]
  summary: Callable[[Sequence[str], Sequence[Reference], Sequence[float]], dict] = _accuracy
  # Why a reference cannot be scored by this metric (None: it can).
  unfit: Callable[[Reference], str | None] = lambda ref: None
  max_new_tokens: int = 32


def _needs_choices(ref: Reference) -> str | None:
  if len(ref.choices) < 2:
    return "mc needs 'choices' (two or more)"
  if len(ref.choices) > len(LETTERS):
    return f"mc takes at most {len(LETTERS)} choices, got {len(ref.choices)}"
  if not any(choice_letter(a, ref.choices) for a in ref.answers):
    return f"the reference {ref.answers[0]!r:.40} names none of the {len(ref.choices)} choices"
  return None


def _needs_yes_no(ref: Reference) -> str | None:
  label = _pope_label(ref)
  return None if label in ("yes", "no") else f"pope needs a yes/no reference, got {ref.answers[0]!r:.40}"


METRICS: dict[str, Metric] = {
  "vqa": Metric(lambda p, r: vqa_accuracy(p, r.answers)),
  "exact": Metric(lambda p, r: exact_match(p, r.answers)),
  "mc": Metric(lambda p, r: choice_accuracy(p, r), _choice_summary, _needs_choices, max_new_tokens=16),
  "pope": Metric(lambda p, r: float(pope_answer(p) == _pope_label(r)), _pope_summary, _needs_yes_no, max_new_tokens=16),
  "shapes": Metric(lambda p, r: float(any(answer_matches(p, a) for a in r.answers)), max_new_tokens=8),
}
AUTO = "auto"


def check_name(name: str, field: str = "metric") -> None:
  """A metric name `field` may take: auto or a METRICS entry."""
  if name != AUTO and name not in METRICS:
    raise UserError(f"{field} {name!r}: unknown (known: {AUTO}, {', '.join(METRICS)})")


def pick(refs: Sequence[Reference], spec: str) -> tuple[str, str]:
  """(metric, why) for `--metric auto`: from what the samples carry."""
  if spec.split(":")[0] == "shapes":
    return "shapes", "the built-in shapes set"
  if refs and all(r.choices for r in refs):
    return "mc", "every sample has 'choices'"
  if refs and all(_needs_yes_no(r) is None for r in refs):
    return "pope", "every reference is yes or no"
  if any(len(r.answers) > 1 for r in refs):
    return "vqa", "samples carry 'answers' lists"
  return "exact", "one reference answer per sample"
