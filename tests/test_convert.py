"""Hugging Face interop: our logits and greedy generations equal transformers' for each family,
HF -> ours -> HF is bit-identical, exports load in transformers, bad input is one clear line."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import hf_models
from hf_models import convert_error
import vlm_jax
from vlm_jax import build as build_lib
from vlm_jax import cli
from vlm_jax import config as config_lib
from vlm_jax import parallel
from vlm_jax.build import flat_params
from vlm_jax.convert import hf_config, hf_export, hf_import, layout as layout_lib, params as params_lib
from vlm_jax.convert.safetensors_io import Reader, read_all
from vlm_jax.data import templates
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.files import read_json
from vlm_jax.infer.generate import Generator
from vlm_jax.models.vit import ViT
from vlm_jax.train import trainer as trainer_lib

TOL = 1e-4
NEW_TOKENS = 20


def one_device_run(config: ml_collections.ConfigDict, image_id: int) -> build_lib.Run:
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return build_lib.build(config, parallel.make_mesh(config.mesh, jax.devices()[:1]), image_id)


def read_component(directory: str, config, run, component: str, slots: tuple[str, ...]) -> dict:
  """One component's params from a HF dir, through the key tables."""
  with Reader(directory) as reader:
    layout = layout_lib.detect(reader.keys(), slots, directory)
    shapes = {k: v.shape for k, v in flat_params(run.abstract_params).items()}
    items = params_lib.plan(config.model, layout, shapes, (component,))
    params_lib.check(reader, items, directory)
    return params_lib.unflatten(params_lib.read(reader, items))[component]


def hf_greedy(model, ids: torch.Tensor, **inputs) -> list[int]:
  model.generation_config.eos_token_id = None  # all 20 tokens, on both sides
  with torch.no_grad():
    out = model.generate(
      input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=hf_models.PAD, **inputs
    )
  return out[0, ids.shape[1] :].tolist()


def our_logits(model, params, tokens: np.ndarray, images: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  apply = jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs))
  return np.asarray(apply(params, tokens, images, positions, np.ones(tokens.shape, np.int32)))


def nchw_to_ours(pixels: torch.Tensor) -> np.ndarray:
  return pixels.numpy().transpose(0, 2, 3, 1)[:, None]  # [B, 1 image, H, W, 3]


# --- 1. LLMs: text-only logits and greedy generation -----------------------------------------
@pytest.mark.parametrize("family", list(hf_models.LLMS))
def test_llm_logits_and_greedy_match_transformers(tmp_path, family):
  hf = hf_models.save_llm(str(tmp_path), family, seed=1)
  config = config_lib.base()
  config.model.dtype = "float32"
  fields, name = hf_config.llm_from_hf(read_json(str(tmp_path)), "config.json")
  assert name == family
  config.model.llm.update(fields)
  config.model.vision.update(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
  run = one_device_run(config, image_id=fields["vocab_size"] - 1)
  # Text only: vision and bridge are never run; zeros stand in for them.
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), dict(run.abstract_params))
  params["llm"] = read_component(str(tmp_path), config, run, "llm", ("llm", "llm_head"))

  ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = hf(ids).logits.numpy()
  images = np.zeros((2, 1, 16, 16, 3), np.float32)
  got = our_logits(run.model, params, ids.numpy(), images)
  err = float(np.abs(got - expected).max())
  print(f"{family}: max abs logits error {err:.2e} (logits up to {np.abs(expected).max():.1f})")
  assert err < TOL

  generator = Generator(run.model, run.mesh, pad_id=hf_models.PAD, context=config.model.llm.max_len)
  ours = generator(params, [ids[0].numpy()], images[:1], max_new_tokens=NEW_TOKENS)[0]
  assert ours == hf_greedy(hf, ids[:1])


# --- 2. Vision towers: the hidden state LLaVA reads ------------------------------------------
@pytest.mark.parametrize(
  "flavour,layer,strategy",
  [("clip", -2, "default"), ("clip", -1, "full"), ("siglip", -1, "full"), ("siglip", -2, "full")],
)
def test_vision_hidden_state_matches_transformers(tmp_path, flavour, layer, strategy):
  hf = hf_models.save_vision(str(tmp_path), flavour, seed=3)
  config = config_lib.base()
  config.model.dtype = "float32"
  fields, n_layers = hf_config.vision_from_hf(read_json(str(tmp_path)), layer, strategy, "config.json")
  config.model.vision.update(fields)
  config.model.llm.update(vocab_size=16, width=32, heads=4, kv_heads=2, head_dim=8, mlp_dim=64)
  run = one_device_run(config, image_id=15)
  params = read_component(str(tmp_path), config, run, "vision", ("vision",))

  pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
  expected = (hidden[:, 1:] if strategy == "default" else hidden).numpy()
  vit = ViT(config.model.vision, jnp.float32)
  got = np.asarray(vit.apply({"params": params}, jnp.asarray(nchw_to_ours(pixels)[:, 0])))
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() < TOL


# --- 3. Whole LLaVA: image + text logits and greedy generation --------------------------------
LLAVAS = {"clip-llama-old-layout": ("clip", "llama", False), "siglip-qwen2-new-layout": ("siglip", "qwen2", True)}


@pytest.fixture(scope="module", params=list(LLAVAS))
def llava(request, tmp_path_factory):
  flavour, family, new_layout = LLAVAS[request.param]
  directory = str(tmp_path_factory.mktemp(request.param))
  kw = {} if flavour == "clip" else dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
  hf, tok = hf_models.save_llava(directory, flavour, family, seed=5, **kw)
  if new_layout:
    hf_models.rewrite_keys(directory)
  image_id = tok.token_to_id("<image>")
  n_image = 4  # (16 / 8)^2 patches; CLIP's CLS is dropped ("default"), SigLIP has none
  words = [tok.token_to_id(w) for w in "what color is the circle".split()]
  ids = torch.tensor([[hf_models.BOS] + [image_id] * n_image + words])
  pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
  with torch.no_grad():
    expected = hf(input_ids=ids, pixel_values=pixels).logits.numpy()
  return dict(dir=directory, hf=hf, ids=ids, pixels=pixels, logits=expected, name=request.param)


def test_llava_logits_and_greedy_match_transformers(llava):
  model = vlm_jax.load(llava["dir"], dtype="float32")  # an HF dir, read straight into 8-way FSDP
  got = our_logits(model.run.model, model.params, llava["ids"].numpy(), nchw_to_ours(llava["pixels"]))
  err = float(np.abs(got - llava["logits"]).max())
  print(f"{llava['name']}: max abs logits error {err:.2e} (logits up to {np.abs(llava['logits']).max():.1f})")
  assert err < TOL
  ours = model.generator(
    model.params, [llava["ids"][0].numpy()], nchw_to_ours(llava["pixels"]), max_new_tokens=NEW_TOKENS
  )[0]
  assert ours == hf_greedy(llava["hf"], llava["ids"], pixel_values=llava["pixels"])
  # Each param sits in the sharding training would give it (embed split 8 ways over fsdp).
  shardings = flat_params(model.run.param_shardings)
  for path, x in flat_params(model.params).items():
    assert x.sharding == shardings[path], path
  assert not model.params["llm"]["layers"]["gate"]["kernel"].sharding.is_fully_replicated


# --- 4. Round trip and export -----------------------------------------------------------------
def assert_same_tensors(a_dir: str, b_dir: str) -> None:
  a, b = read_all(a_dir), read_all(b_dir)
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    assert a[key].tobytes() == b[key].tobytes(), key


def hf_logits(directory: str, ids: torch.Tensor, pixels: torch.Tensor) -> np.ndarray:
  model = transformers.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager")
  with torch.no_grad():
    return model(input_ids=ids, pixel_values=pixels).logits.numpy()


def test_round_trip_is_bit_identical_and_export_loads_in_transformers(llava, tmp_path):
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  assert cli.main(["convert", "--from-hf", llava["dir"], "--out", work]) == 0
  assert cli.main(["convert", "--checkpoint", work, "--to-hf", out]) == 0
  assert_same_tensors(llava["dir"], out)  # same keys (layout), dtypes and bytes
  np.testing.assert_allclose(hf_logits(out, llava["ids"], llava["pixels"]), llava["logits"], atol=TOL)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = Tokenizer.load(os.path.join(work, "hf"))
  assert tok("USER: what color", add_special_tokens=False).input_ids == ours.encode("USER: what color")


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
  hf, _ = hf_models.save_llava(str(tmp_path / "hf"), "clip", "llama", seed=7)
  hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
  model = vlm_jax.load(str(tmp_path / "hf"), dtype="float32")
  assert model.params["llm"]["lm_head"].dtype == jnp.float32  # fp32 master params, exact from bf16
  hf_export.export(model.config, model.tokenizer, model.params, model.origin, str(tmp_path / "out"))
  assert_same_tensors(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_assembled_stage1_model_exports_to_a_matching_llava(tmp_path):
  """CLIPModel (with its text tower) + a Llama whose tokenizer has no <image>: a fresh VLM whose
  export loads in transformers and gives our logits; the CLIP layer after -2 travels along."""
  hf_models.save_vision(str(tmp_path / "clip"), "clip", seed=8, full=True)
  words = hf_models.save_tokenizer(str(tmp_path / "llm"), image=False).get_vocab_size()
  hf_models.save_llm(str(tmp_path / "llm"), "llama", vocab=words, seed=9)  # no row to spare for <image>
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  assert (
    cli.main(["convert", "--from-hf", str(tmp_path / "llm"), "--vision", str(tmp_path / "clip"), "--out", work]) == 0
  )
  model = vlm_jax.load(work, dtype="float32")
  assert model.tokenizer.image_id == words and model.config.model.llm.vocab_size == words + 1
  embedding = np.asarray(model.params["llm"]["embedder"]["embedding"])
  np.testing.assert_allclose(embedding[words], embedding[:words].mean(0), rtol=1e-5)  # the new row
  assert model.config.model.vision.depth == 2 and not model.config.model.vision.keep_cls
  hf_export.export(model.config, model.tokenizer, model.params, model.origin, out)
  hc = json.load(open(os.path.join(out, "config.json")))
  assert hc["vision_config"]["num_hidden_layers"] == 3 and hc["vision_feature_layer"] == -2
  clip = read_all(str(tmp_path / "clip"))
  exported = read_all(out)
  assert (
    exported["vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"].tobytes()
    == clip["vision_model.encoder.layers.2.mlp.fc1.weight"].tobytes()
  )
  ids = torch.tensor([[hf_models.BOS] + [model.tokenizer.image_id] * 4 + model.tokenizer.encode("what color")])
  pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(10))
  ours = our_logits(model.run.model, model.params, ids.numpy(), nchw_to_ours(pixels))
  np.testing.assert_allclose(hf_logits(out, ids, pixels), ours, atol=TOL)


def test_model_trained_here_exports_to_transformers(tmp_path):
  """A from-scratch model (SigLIP flavour, our sentencepiece tokenizer): the tokenizer, template
  and weights all load in transformers and agree with ours."""
  config = config_lib.base()
  config.model.dtype = "float32"
  config.model.vision.update(image_size=16, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
  config.model.llm.update(width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64)
  tokenizer = Tokenizer.load("shapes")
  build_lib.resolve_model_config(config, tokenizer.vocab_size)
  run = one_device_run(config, tokenizer.image_id)
  params = run.init_params(jax.random.key(11))
  out = str(tmp_path / "out")
  hf_export.export(config, tokenizer, params, None, out)
  prompt = templates.encode_prompt("What color is the circle?", tokenizer, 4, "simple")
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  rendered = hf_tok.apply_chat_template(
    [{"role": "user", "content": "<image>\nWhat color is the circle?"}], tokenize=False, add_generation_prompt=True
  )
  hf_ids = hf_tok(rendered).input_ids  # BOS added by the tokenizer, as LLaVA processors do
  assert [i for i in prompt if i != tokenizer.image_id] == [i for i in hf_ids if i != tokenizer.image_id]
  ids = torch.tensor(prompt[None])
  pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(12))
  ours = our_logits(run.model, params, ids.numpy(), nchw_to_ours(pixels))
  np.testing.assert_allclose(hf_logits(out, ids, pixels), ours, atol=TOL)


# --- 5. Tokenizers and chat templates ---------------------------------------------------------
def test_hf_tokenizer_and_chat_template_match_transformers(llava):
  ours = Tokenizer.load(llava["dir"])
  theirs = transformers.AutoTokenizer.from_pretrained(llava["dir"])
  text = "USER: <image> what color is the circle ASSISTANT: red"
  assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
  turns = [
    ("user", "<image>\nwhat color is the circle"),
    ("assistant", "red"),
    ("user", "a cat"),
    ("assistant", "blue"),
  ]
  messages = [{"role": r, "content": t} for r, t in turns]
  encoded = templates.encode_conversation(turns, ours, image_tokens=3, template="hf")
  rendered = theirs.apply_chat_template(messages, tokenize=False)
  expected = theirs(rendered).input_ids
  expanded = [i for t in expected for i in ([t] * 3 if t == ours.image_id else [t])]
  assert encoded.tokens.tolist() == expanded
  supervised = [ours.decode([t]) for t, m in zip(encoded.tokens, encoded.loss_mask) if m]
  assert [t for t in supervised if t] == ["red", "blue"]  # answers + their </s> (decoded empty)
  assert encoded.tokens[encoded.loss_mask].tolist().count(ours.eos_id) == 2
  prompt = templates.encode_prompt("what color", ours, 3, "hf")
  assert ours.decode(prompt) == "USER: what color ASSISTANT:" and prompt[0] == ours.bos_id
  assert (prompt == ours.image_id).sum() == 3


# llava-hf/llava-1.5-7b-hf's processor template: typed content parts and {% generation %}.
LLAVA15_TEMPLATE = (
  "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
  "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
  "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
  "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
  "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
  "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_llava_processor_template_with_typed_parts(tmp_path):
  hf_models.save_tokenizer(str(tmp_path), template=LLAVA15_TEMPLATE)
  ours = Tokenizer.load(str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  rendered = theirs.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color"}]}],
    tokenize=False,
    add_generation_prompt=True,
  )
  expected = [i for t in theirs(rendered).input_ids for i in ([t] * 2 if t == ours.image_id else [t])]
  assert templates.encode_prompt("what color", ours, 2, "hf").tolist() == expected
  encoded = templates.encode_conversation([("user", "<image>\nwhat color"), ("assistant", "red")], ours, 2, "hf")
  assert ours.decode(encoded.tokens[encoded.loss_mask]) == "red"


def test_generate_cli_reads_an_hf_dir_and_its_conversion_alike(llava, tmp_path, capsys):
  image = tmp_path / "a.png"
  import PIL.Image

  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)).save(image)
  work = str(tmp_path / "work")
  assert cli.main(["convert", "--from-hf", llava["dir"], "--out", work]) == 0
  outputs = []
  for path in (llava["dir"], work):
    capsys.readouterr()
    assert (
      cli.main(
        [
          "generate",
          "--checkpoint",
          path,
          "--image",
          str(image),
          "--prompt",
          "what color",
          "--max-new-tokens",
          "5",
          "--json",
        ]
      )
      == 0
    )
    outputs.append(json.loads(capsys.readouterr().out))
  assert outputs[0]["token_ids"] == outputs[1]["token_ids"] and len(outputs[0]["token_ids"]) >= 1


def test_a_run_can_start_from_a_converted_model(small_llava, tmp_path):
  """config.model.init_from: a fresh run's params come from an HF dir or a converted workdir."""
  work = hf_import.convert_llava(small_llava, str(tmp_path / "work"))
  with open(os.path.join(work, "config.json")) as f:
    config = config_lib.from_json(f.read())
  config.stage = "stage1"
  expected = flat_params(vlm_jax.load(work).params)
  tokenizer = Tokenizer.load(os.path.join(work, "hf"))
  for source in (small_llava, work):
    config.model.init_from = source
    trainer = trainer_lib.make(one_device_run(config, tokenizer.image_id))
    state = trainer.start(hf_import.load_params(source, trainer.run))  # as the loop starts from init_from
    assert jax.tree.structure(state) == jax.tree.structure(trainer.abstract_state)
    for path, x in flat_params(state["params"]).items():
      np.testing.assert_array_equal(np.asarray(x), np.asarray(expected[path]), err_msg=path)
  config.model.llm.mlp_dim = 48  # a model the checkpoints do not fit
  for source, message in ((small_llava, "layers.0.mlp.gate_proj.weight has shape"), (work, "do not fit")):
    config.model.init_from = source
    with pytest.raises(UserError, match=message):
      hf_import.load_params(source, one_device_run(config, tokenizer.image_id))


# --- 6. Bad input: one line naming the key or file, exit status 2 -----------------------------
@pytest.fixture
def small_llava(tmp_path):
  directory = str(tmp_path / "hf")
  hf_models.save_llava(directory, "clip", "llama", seed=13)
  return directory


def test_unsupported_architecture(small_llava, tmp_path, capsys):
  hf_models.edit_json(
    os.path.join(small_llava, "config.json"), model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"]
  )
  line = convert_error(capsys, "--from-hf", small_llava, "--out", str(tmp_path / "o"))
  assert "Qwen2VLForConditionalGeneration" in line and "config.json" in line


def test_unsupported_llm_setting(small_llava, tmp_path, capsys):
  hf_models.edit_json(
    os.path.join(small_llava, "config.json"),
    **{"text_config.rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
  )
  line = convert_error(capsys, "--from-hf", small_llava, "--out", str(tmp_path / "o"))
  assert "rope_type" in line and "yarn" in line


def test_missing_tensor(small_llava, tmp_path, capsys):
  key = "language_model.model.layers.1.mlp.up_proj.weight"
  hf_models.rewrite_keys(small_llava, renames=(), drop=(key,))
  line = convert_error(capsys, "--from-hf", small_llava, "--out", str(tmp_path / "o"))
  assert key in line and "missing" in line
  assert not os.path.exists(tmp_path / "o")  # nothing written


def test_mismatched_shape(small_llava, tmp_path, capsys):
  hf_models.edit_json(os.path.join(small_llava, "config.json"), **{"text_config.intermediate_size": 48})
  line = convert_error(capsys, "--from-hf", small_llava, "--out", str(tmp_path / "o"))
  assert "language_model.model.layers.0.mlp.gate_proj.weight" in line and "[64, 32]" in line and "[48, 32]" in line


def test_missing_tokenizer(small_llava, tmp_path, capsys):
  os.remove(os.path.join(small_llava, "tokenizer.json"))
  line = convert_error(capsys, "--from-hf", small_llava, "--out", str(tmp_path / "o"))
  assert small_llava in line and "tokenizer.json" in line


def test_bad_convert_flags(small_llava, tmp_path, capsys):
  assert "either" in convert_error(capsys, "--from-hf", small_llava, "--to-hf", str(tmp_path / "x"))
  assert "--out" in convert_error(capsys, "--from-hf", small_llava)
  assert "no such directory" in convert_error(capsys, "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
  os.makedirs(tmp_path / "full")
  (tmp_path / "full" / "x").write_text("")
  assert "not an empty directory" in convert_error(
    capsys, "--checkpoint", small_llava, "--to-hf", str(tmp_path / "full")
  )
