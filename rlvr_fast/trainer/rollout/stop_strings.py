"""Where a base model's completion ends: at the template's next turn, not only at EOS.

A pretrained model prompted with a plain-text template (``base_prompts.BASE_PROMPTS``, e.g. gemma3-270m's
"Question: <problem>\\nAnswer:") rarely emits EOS after its answer: it writes the next "Question: ..." of an imagined
document and answers that too. Graded as sampled, such a completion is scored on the last answer it wrote, the one to
its own invented question. So a template names stop strings (``BASE_STOP_STRINGS``), as evaluation harnesses do for
few-shot prompts, and ``cut_at_stop_strings`` ends each completion at the first of them:

- the completion keeps the sampled tokens up to and including the one that completes the stop string (the policy
  sampled them, and the episode ended on them: they are trained and their log-probs are read, like an EOS), and the
  rest is masked and padded; a completion cut there is not ``truncated``;
- its text, what the reward and the evaluation read, is the text before the stop string.

The stop strings are found from the tokenizer's chat template (``stop_strings_of``), which is how the base template
travels (model load, a checkpoint's saved tokenizer, the prompt-length check), so every engine reads the same ones.
An instruction-tuned model's own chat template has none: its completions end at EOS only.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlvr_fast.trainer.rollout.base_prompts import BASE_PROMPTS, base_chat_template

# base prompt name -> the strings that start its next turn (the answer is over when the model writes one)
BASE_STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "question_answer": ("\nQuestion:",),
    "plain": (),  # no turn structure: EOS only
}
assert set(BASE_STOP_STRINGS) == set(BASE_PROMPTS), "every base prompt names its stop strings"


def stop_strings_of(tokenizer) -> tuple[str, ...]:
    """The stop strings of the base template that is ``tokenizer``'s chat template; () for any other template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ()
    for name, stops in BASE_STOP_STRINGS.items():
        if stops and template in (base_chat_template(name, bos=True), base_chat_template(name, bos=False)):
            return stops
    return ()


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop_strings(rollout, tokenizer, stops: tuple[str, ...]):
    """``rollout`` with every completion whose text holds a stop string ended there (module doc); the rollout itself
    when none does. The token that completes the stop string is found by bisection over decoded prefixes (a prefix's
    text grows with it), so a cut completion costs O(log Lc) decodes."""
    if not stops:
        return rollout
    rows = [i for i, text in enumerate(rollout.texts) if _first_stop(text, stops) is not None]
    if not rows:
        return rollout
    ids, mask = rollout.completion_ids.clone(), rollout.completion_mask.clone()
    truncated, texts = rollout.truncated.clone(), list(rollout.texts)
    logprobs = None if rollout.rollout_logprobs is None else rollout.rollout_logprobs.clone()

    def decode(row: torch.Tensor) -> str:
        return tokenizer.decode(row, skip_special_tokens=True)

    for i in rows:
        tokens = ids[i, : int(mask[i].sum())]
        lo, hi = 1, tokens.numel()  # decode(tokens[:hi]) holds a stop string; find the smallest such length
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(decode(tokens[:mid]), stops) is not None:
                hi = mid
            else:
                lo = mid + 1
        mask[i, hi:] = 0
        ids[i, hi:] = tokenizer.pad_token_id
        if logprobs is not None:
            logprobs[i, hi:] = 0.0
        truncated[i] = False
        text = decode(tokens[:hi])
        texts[i] = text[: _first_stop(text, stops)]
    return replace(
        rollout, completion_ids=ids, completion_mask=mask, truncated=truncated, texts=texts, rollout_logprobs=logprobs
    )
