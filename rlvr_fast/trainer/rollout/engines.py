"""Sampling G completions per prompt behind a small interface, so another engine (vLLM, SGLang) can plug in.

A backend turns tokenised prompts into a ``Rollout``: left-padded prompts and right-padded completions with their
masks. The completion mask covers the sampled tokens up to and including the first EOS (or, for a base template
with stop strings, the token that completes the first of them: ``stop_strings.py``); a completion that never emitted
EOS within ``max_new_tokens`` is ``truncated``.

``HFGeneration`` prefills each prompt once and shares its cache among the prompt's samples (``prefix_sampling``)
where the model allows it (``prefix_sharing``: auto | on | off, as for the update); otherwise it calls transformers'
``generate``. Both sample the same distribution; the same seed gives different tokens on the two paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rlvr_fast.trainer.precision import Precision, autocast_region
from rlvr_fast.trainer.rollout.shared_prefix_sampler import (
    diverged_rows,
    sample_shared_prefix,
    unreproduced_generation_settings,
)
from rlvr_fast.trainer.rollout.stop_strings import cut_at_stop_strings, stop_strings_of
from rlvr_fast.trainer.update.shared_prefix_forward import resolve_prefix_sharing


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B*G, Lp) left-padded
    prompt_mask: torch.Tensor  # (B*G, Lp) 1 on prompt tokens
    completion_ids: torch.Tensor  # (B*G, Lc) right-padded
    completion_mask: torch.Tensor  # (B*G, Lc) 1 on sampled tokens up to and including EOS
    truncated: torch.Tensor  # (B*G,) bool: no EOS within max_new_tokens
    texts: list[str]  # (B*G,) decoded completions, special tokens removed
    # (B*G, Lc) float32: the engine's log-probs of the sampled tokens, 0 past completion_mask (the off-policy
    # correction's logp_rollout); None from an engine that reports none (the native sampler)
    rollout_logprobs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: torch.Tensor) -> Rollout:
        idx = rows.tolist()
        return Rollout(
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            self.completion_ids[rows],
            self.completion_mask[rows],
            self.truncated[rows],
            [self.texts[i] for i in idx],
            None if self.rollout_logprobs is None else self.rollout_logprobs[rows],
        )


def finite_scores_check():
    """A logits processor list for ``generate`` (applied after its own warpers) that raises DivergedSamplingError
    when a row's scores give no finite distribution: softmax is finite exactly when the row's largest score is (a NaN
    or +inf anywhere, or every token at -inf, makes it not). One max per row and decode step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteScores(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            top = scores.amax(dim=-1)
            if not bool(torch.isfinite(top).all()):
                raise diverged_rows(torch.softmax(scores.float(), dim=-1))
            return scores

    return LogitsProcessorList([FiniteScores()])


class GenerationBackend(Protocol):
    def generate(
        self, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Rollout: ...


class HFGeneration:
    """Sampling with temperature and top_p alone (top_k disabled) from a transformers causal LM: each prompt prefilled
    once for its n samples where ``prefix_sharing`` allows, else transformers' ``generate`` (module doc)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_prompt_length: int,
        prefix_sharing: str = "auto",
        precision: Precision | None = None,
    ):
        self.model = model
        # every generate call is ONE autocast region (under autocast_bf16): each weight is cast to bf16 once per call,
        # not once per decode token; the sampler reads the logits in float32 (softmax / top-p on float32)
        self.precision = precision
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        # sliding-window layers share too (their cache layers stay transformers'): Gemma 3's rollout, ~15 of 18 layers
        self.shared_prefix = resolve_prefix_sharing(model, prefix_sharing, sliding_window_ok=True)
        extra = unreproduced_generation_settings(model) if self.shared_prefix else []
        if extra and prefix_sharing == "on":
            raise ValueError(
                f"prefix_sharing='on' but {type(model).__name__}'s generation_config sets {', '.join(extra)}, which "
                f"the shared-prefix sampler does not apply; set prefix_sharing='auto' or 'off'"
            )
        self.shared_prefix = self.shared_prefix and not extra
        self.stop_strings = stop_strings_of(tokenizer)  # a base template's next turn ends the answer (stop_strings.py)

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Rollout:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        longest = int(enc["attention_mask"].sum(dim=1).max()) if len(prompts) else 0
        if longest > self.max_prompt_length:
            raise ValueError(
                f"a prompt has {longest} tokens, more than max_prompt_length={self.max_prompt_length}; "
                f"raise max_prompt_length or shorten the prompts"
            )
        device = next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc["attention_mask"].to(device)
        torch.manual_seed(seed)  # per-call seed: a resumed run samples exactly what the uninterrupted one did
        with autocast_region(self.precision):
            completion = self._sample(input_ids, attention_mask, n, max_new_tokens, temperature, top_p)
        is_eos = completion == tok.eos_token_id
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion.shape[1])
        positions = torch.arange(completion.shape[1], device=device)
        completion_mask = (positions[None, :] <= first_eos[:, None]).to(attention_mask.dtype)
        completion = torch.where(completion_mask.bool(), completion, tok.pad_token_id)
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        rollout = Rollout(
            prompt_ids=input_ids.repeat_interleave(n, dim=0),
            prompt_mask=attention_mask.repeat_interleave(n, dim=0),
            completion_ids=completion,
            completion_mask=completion_mask,
            truncated=~has_eos,
            texts=texts,
        )
        return cut_at_stop_strings(rollout, tok, self.stop_strings)

    def _sample(self, input_ids, attention_mask, n, max_new_tokens, temperature, top_p) -> torch.Tensor:
        """(B*n, max_new_tokens) completions: the shared-prefix sampler where it applies, else ``generate``."""
        if not self.shared_prefix:
            return self._generate(input_ids, attention_mask, n, max_new_tokens, temperature, top_p)
        tok = self.tokenizer
        return sample_shared_prefix(
            self.model,
            input_ids,
            attention_mask,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    def _generate(self, input_ids, attention_mask, n, max_new_tokens, temperature, top_p) -> torch.Tensor:
        """(B*n, max_new_tokens) completions from transformers' ``generate`` (each prompt repeated n times)."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=finite_scores_check(),  # NaN/inf logits: DivergedSamplingError, not multinomial's
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        completion = out[:, input_ids.shape[1] :]
        if completion.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
            pad = completion.new_full((completion.shape[0], max_new_tokens - completion.shape[1]), tok.pad_token_id)
            completion = torch.cat([completion, pad], dim=1)
        return completion
