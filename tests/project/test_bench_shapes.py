"""The shapes of benchmarks/bench_train_step_vs_trl.py: both sides must see the same prompt tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rlvr_fast.testing import char_tokenizer

COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "trl_bench_common.py"
# A ChatML-style template (SmolLM2's shape: a default system message when none is given), over single characters.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nYou are a helpful assistant.</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("trl_bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tokenizer():
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("shape", ["default", "long-prompt"])
def test_both_sides_get_the_same_prompt_tokens(common, tokenizer, shape):
    system_prompt = common.SHAPES[shape].system_prompt
    messages = ["What is 3 + 7? Reply with just the number.", "What is 12 + 1?"]
    longest = common.check_same_prompt_tokens(tokenizer, messages, system_prompt)
    rendered = tokenizer.apply_chat_template(
        common.chat_messages(messages[0], system_prompt), add_generation_prompt=True, tokenize=False
    )
    assert longest == len(rendered)  # one token per character
    if system_prompt is None:
        assert "You are a helpful assistant." in rendered
    else:
        assert system_prompt in rendered and "You are a helpful assistant." not in rendered


def test_a_difference_in_tokens_is_refused(common, tokenizer, monkeypatch):
    render = tokenizer.apply_chat_template

    def with_extra_token(conversation, **kwargs):  # a template path that adds a token on TRL's side only
        out = render(conversation, **kwargs)
        if kwargs.get("tokenize"):
            out["input_ids"] = [[1, *row] for row in out["input_ids"]]
        return out

    monkeypatch.setattr(tokenizer, "apply_chat_template", with_extra_token)
    with pytest.raises(RuntimeError, match="different prompt tokens"):
        common.check_same_prompt_tokens(tokenizer, ["What is 1 + 1?"], None)


def test_the_benchmark_shapes_and_their_targets(common):
    default, long_prompt = common.SHAPES["default"], common.SHAPES["long-prompt"]
    assert (default.prompts, default.group, default.completion_len) == (4, 8, 64)
    assert (long_prompt.prompts, long_prompt.group, long_prompt.completion_len) == (4, 8, 32)
    assert default.targets == {"seconds_ratio": 0.5, "peak_rss_ratio": 0.5}
    assert long_prompt.targets == {"seconds_ratio": 0.3}
    assert all(q in long_prompt.system_prompt for q, _, _ in common.FEW_SHOT_EXAMPLES)
