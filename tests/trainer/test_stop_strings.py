"""A base template's stop strings end a completion where the model starts the next turn: the tokens up to the one
completing "\\nQuestion:" kept (masked in, not truncated), the text before it graded; other templates untouched."""

import pytest
import torch

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.rollout.base_prompts import use_base_prompt
from rlvr_fast.trainer.rollout.engines import HFGeneration, Rollout
from rlvr_fast.trainer.rollout.stop_strings import BASE_STOP_STRINGS, cut_at_stop_strings, stop_strings_of

STOPS = BASE_STOP_STRINGS["question_answer"]


def base_tokenizer(name: str = "question_answer"):
    tok = char_tokenizer()
    assert use_base_prompt(tok, name)
    return tok


def rollout_of(tok, completions: list[str], width: int, logprobs: bool = False) -> Rollout:
    """Right-padded completions; a completion ending in <eos> is masked through it, others are truncated."""
    rows, masks = [], []
    for text in completions:
        ids = tok(text, add_special_tokens=False)["input_ids"][:width]
        rows.append(ids + [tok.pad_token_id] * (width - len(ids)))
        masks.append([1] * len(ids) + [0] * (width - len(ids)))
    ids = torch.tensor(rows)
    n = len(completions)
    return Rollout(
        prompt_ids=torch.full((n, 2), 5),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=ids,
        completion_mask=torch.tensor(masks),
        truncated=torch.tensor([not t.endswith("<eos>") for t in completions]),
        texts=tok.batch_decode(ids, skip_special_tokens=True),
        rollout_logprobs=-torch.rand(n, width) * torch.tensor(masks) if logprobs else None,
    )


def test_stop_strings_follow_the_chat_template():
    assert stop_strings_of(base_tokenizer()) == ("\nQuestion:",)
    assert stop_strings_of(base_tokenizer("plain")) == ()
    assert stop_strings_of(char_tokenizer()) == ()  # no chat template
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # an instruct model's own
    assert stop_strings_of(tok) == ()


def test_a_completion_that_asks_the_next_question_ends_there():
    tok = base_tokenizer()
    texts = [
        " 5\nQuestion: What is 3 + 4?\nAnswer: 7\nQuestion: x",  # cut at the first stop, not the last
        " 12<eos>",  # ended by EOS: untouched
        " 9 and more",  # truncated without a stop: untouched
        "\nQuestion: 1",  # a stop string at once: an empty answer
    ]
    before = rollout_of(tok, texts, width=48, logprobs=True)
    after = cut_at_stop_strings(before, tok, STOPS)
    kept = len(" 5\nQuestion:")
    assert after.texts == [" 5", " 12", " 9 and more", ""]
    assert after.completion_mask[0].sum() == kept and after.completion_mask[3].sum() == len("\nQuestion:")
    assert tok.decode(after.completion_ids[0, :kept]) == " 5\nQuestion:"
    assert bool((after.completion_ids[0, kept:] == tok.pad_token_id).all())
    assert bool((after.rollout_logprobs[0, kept:] == 0).all())
    assert torch.equal(after.rollout_logprobs[0, :kept], before.rollout_logprobs[0, :kept])
    assert after.truncated.tolist() == [False, False, True, False]
    for i in (1, 2):  # rows without a stop string are the same tensors' rows
        assert torch.equal(after.completion_ids[i], before.completion_ids[i])
        assert torch.equal(after.completion_mask[i], before.completion_mask[i])
    assert cut_at_stop_strings(before, tok, ()) is before


@pytest.mark.parametrize("prefix_sharing", ["on", "off"])
def test_the_native_engine_cuts_a_base_model_at_the_next_question(monkeypatch, prefix_sharing):
    """HFGeneration of a tokenizer with the question_answer template: whatever the sampler draws, the rollout ends
    at "\\nQuestion:"; with the plain template the same draw is left whole."""
    tok = base_tokenizer()
    drawn = tok(" 5\nQuestion: 1+1?\nAnswer: 2", add_special_tokens=False)["input_ids"]
    model = tiny_causal_lm(tok)

    def sample(self, input_ids, attention_mask, n, max_new_tokens, temperature, top_p):
        return torch.tensor(drawn[:max_new_tokens]).repeat(input_ids.shape[0] * n, 1)

    monkeypatch.setattr(HFGeneration, "_sample", sample)
    engine = HFGeneration(model, tok, max_prompt_length=64, prefix_sharing=prefix_sharing)
    settings = dict(max_new_tokens=len(drawn), temperature=1.0, top_p=1.0, seed=0)
    out = engine.generate(["Question: 2+3?\nAnswer:"], n=2, **settings)
    assert out.texts == [" 5", " 5"] and out.truncated.tolist() == [False, False]
    assert out.completion_mask.sum(dim=1).tolist() == [len(" 5\nQuestion:")] * 2
    plain = HFGeneration(model, base_tokenizer("plain"), max_prompt_length=64, prefix_sharing=prefix_sharing)
    whole = plain.generate(["2+3?"], n=1, **settings)
    assert whole.texts == [" 5\nQuestion: 1+1?\nAnswer: 2"] and whole.truncated.tolist() == [True]
