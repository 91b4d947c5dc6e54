"""Chat templates: hand-checked token/label layouts, and equality with transformers'
apply_chat_template for the templates that models ship (Llama 3, Qwen2 ChatML, Gemma)."""

import json
import os
import re

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from vlm_jax.data import IMAGE, hf_tokenizer
from vlm_jax.data.templates import TEMPLATES, check_tokenizer, encode_conversation, encode_prompt
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import BadSample, UserError

TURNS = [
  ("user", f"{IMAGE}\nWhat color is the circle?"),
  ("assistant", "red"),
  ("user", "And the square?"),
  ("assistant", "blue, I think"),
]


@pytest.fixture(scope="module")
def sp():
  return Tokenizer.load("shapes")


def _runs(tok, enc) -> list[tuple[bool, str]]:
  """The sequence as (supervised, decoded text) runs: BOS/EOS by name, a block of image ids as <image>."""
  names = {tok.bos_id: "<s>", tok.eos_id: "</s>", tok.image_id: IMAGE}
  runs, previous = [], None
  for i, m in zip(enc.tokens.tolist(), enc.loss_mask.tolist()):
    if not (i == previous == tok.image_id):
      text = names.get(i) or tok.decode([i])
      runs[-1:] = [(m, runs[-1][1] + text)] if runs and runs[-1][0] == m else runs[-1:] + [(m, text)]
    previous = i
  return runs


@pytest.mark.parametrize(
  "template, expected",
  [
    (
      "simple",
      [
        (False, "<s>USER: <image>\nWhat color is the circle? ASSISTANT:"),
        (True, " red</s>"),
        (False, "USER: And the square? ASSISTANT:"),
        (True, " blue, I think</s>"),
      ],
    ),
    (
      "vicuna_v1",
      [
        (
          False,
          "<s>A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions. "
          "USER: <image>\nWhat color is the circle? ASSISTANT:",
        ),
        (True, " red</s>"),
        (False, "USER: And the square? ASSISTANT:"),
        (True, " blue, I think</s>"),
      ],
    ),
  ],
)
def test_vicuna_layouts(sp, template, expected):
  enc = encode_conversation(TURNS, sp, image_tokens=1, template=template)
  assert _runs(sp, enc) == expected
  # The runs concatenate to the tokens of the whole text (no drift at the boundaries).
  whole = "".join(text for _, text in expected).replace("<s>", "").replace("</s>", "\x00")
  ids = [sp.bos_id]
  for i, part in enumerate(whole.split("\x00")):
    ids += ([sp.eos_id] if i else []) + sp.encode(part)
  assert enc.tokens.tolist() == ids


def test_plain_captions(sp):
  enc = encode_conversation(
    [("user", f"Describe it.\n{IMAGE}"), ("assistant", "A red circle.")], sp, image_tokens=3, template="plain"
  )
  assert _runs(sp, enc) == [(False, f"<s>{IMAGE}"), (True, "A red circle.\n")]
  assert enc.tokens.tolist().count(sp.image_id) == 3 and sp.eos_id not in enc.tokens
  with pytest.raises(BadSample, match="one round"):
    encode_conversation(TURNS, sp, image_tokens=1, template="plain")
  with pytest.raises(BadSample, match="needs an <image>"):
    encode_conversation([("user", "hi"), ("assistant", "x")], sp, image_tokens=1, template="plain")
  assert encode_prompt("Describe it.", sp, 3, template="plain").tolist() == [sp.bos_id] + [sp.image_id] * 3


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_prompt_is_the_conversation_up_to_the_answer(sp, template):
  turns = TURNS[:2] if template == "plain" else TURNS
  enc = encode_conversation(turns, sp, image_tokens=2, template=template)
  prompt = encode_prompt(turns[0][1], sp, 2, template=template)
  assert enc.tokens[: len(prompt)].tolist() == prompt.tolist()
  assert not enc.loss_mask[: len(prompt)].any() and enc.loss_mask[len(prompt)]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_answer_is_supervised_and_nothing_else(sp, template):
  turns = TURNS[:2] if template == "plain" else TURNS
  enc = encode_conversation(turns, sp, image_tokens=2, template=template)
  supervised = sp.decode(enc.tokens[enc.loss_mask])
  for _, answer in turns[1::2]:
    assert answer in supervised
  assert "USER" not in supervised and "What color" not in supervised and sp.image_id not in enc.tokens[enc.loss_mask]


# --- against transformers --------------------------------------------------------------------

SPECIALS = [
  "<pad>",
  "<|begin_of_text|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",
  "<|im_start|>",
  "<|im_end|>",
  "<bos>",
  "<eos>",
  "<start_of_turn>",
  "<end_of_turn>",
  IMAGE,
]
HF_TEMPLATES = {
  # Meta-Llama-3-8B-Instruct
  "llama3": (
    "<|begin_of_text|>",
    "<|eot_id|>",
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
  ),
  # Qwen2-7B-Instruct
  "chatml": (
    None,
    "<|im_end|>",
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
  ),
  # gemma-2b-it
  "gemma": (
    "<bos>",
    "<eos>",
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
  ),
}
SUPERVISED = {"llama3": "{}<|eot_id|>", "chatml": "{}<|im_end|>", "gemma": "{}<end_of_turn>"}


def _hf_dir(directory: str, template: str) -> str:
  """A byte-level BPE tokenizer.json with every template's special tokens, and its config."""
  bos, eos, chat = HF_TEMPLATES[template]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [t for _, t in TURNS] * 20 + ["user assistant model system You are a helpful assistant."] * 20
  tok.train_from_iterator(
    corpus,
    trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
  )
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": "<pad>",
        "chat_template": chat,
      },
      f,
    )
  return directory


@pytest.mark.parametrize("template", sorted(HF_TEMPLATES))
def test_matches_apply_chat_template(tmp_path, template):
  directory = _hf_dir(str(tmp_path / template), template)
  ours = hf_tokenizer.load(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  messages = [{"role": role, "content": text} for role, text in TURNS]
  text = theirs.apply_chat_template(messages, tokenize=False)
  enc = encode_conversation(TURNS, ours, image_tokens=1, template=template)
  assert enc.tokens.tolist() == theirs.encode(text, add_special_tokens=False)
  # Supervised: exactly each answer with its end-of-turn marker.
  runs = np.split(enc.tokens, np.flatnonzero(np.diff(enc.loss_mask.astype(int))) + 1)
  supervised = [theirs.decode(r.tolist()) for r in runs[1::2]]
  assert supervised == [SUPERVISED[template].format(a) for _, a in TURNS[1::2]]
  prompt = theirs.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
  assert encode_prompt(TURNS[0][1], ours, 1, template=template).tolist() == theirs.encode(
    prompt, add_special_tokens=False
  )


@pytest.mark.parametrize(
  "template, token", [("llama3", "<|end_header_id|>"), ("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>")]
)
def test_a_template_needs_its_special_tokens_in_the_vocabulary(sp, tmp_path, template, token):
  """Checked at start (data/pipeline.py): each special token a built-in template writes is one
  token of the tokenizer; 'hf' needs the tokenizer's own chat template."""
  check_tokenizer(template, hf_tokenizer.load(_hf_dir(str(tmp_path), template)))  # its model's tokenizer: fine
  check_tokenizer("hf", hf_tokenizer.load(_hf_dir(str(tmp_path), template)))
  check_tokenizer("simple", sp)
  with pytest.raises(
    UserError, match=f"config.data.template: '{template}' writes {re.escape(token)}, which is not a token of shapes"
  ):
    check_tokenizer(template, sp)
  with pytest.raises(UserError, match="config.data.template: 'hf' needs the tokenizer's own chat template"):
    check_tokenizer("hf", sp)
