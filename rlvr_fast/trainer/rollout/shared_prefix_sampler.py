"""The rollout with a shared prefix: each prompt is prefilled once, its KV cache copied to its G samples, and a decode
loop samples with transformers' own temperature and top-p warpers (top-k off), dropping each row from the batch once it
has emitted EOS.

``model.generate(num_return_sequences=G)`` repeats every prompt G times before the prefill (G x P prefill tokens per
group) and keeps finished rows in the batch until the last one stops. Here the prefill costs P tokens per group and a
decode step costs one token per unfinished row.

The sampler: scores = logits / temperature, then top-p as ``TopPLogitsWarper`` (the same objects ``generate`` builds),
softmax in float32, one draw per row. The draw is by inverse CDF from a uniform that every row takes at every step,
finished or not (``torch.rand(R)`` from the global generator, seeded per call by the caller): a row's tokens depend only
on the seed and its own history, not on which other rows are still running, so seeded rollouts and ``--resume`` are
exact. ``generate`` draws with ``torch.multinomial`` instead, so the same seed gives other (equally distributed) tokens
than the unshared path.
"""

from __future__ import annotations

import torch

from rlvr_fast.trainer.rollout.kv_cache import preallocated_cache
from rlvr_fast.trainer.update.finite_guard import DivergedSamplingError
from rlvr_fast.trainer.update.shared_prefix_forward import cache_argument, positions_from_mask

# GenerationConfig fields that make ``generate`` add a logits processor or stopping rule this sampler does not apply;
# a model whose generation_config sets any of them away from the default keeps the unshared ``generate`` path.
UNREPRODUCED_GENERATION_FIELDS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_new_tokens",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "remove_invalid_values",
    "renormalize_logits",
    "watermarking_config",
    "stop_strings",
    "max_time",
)


def unreproduced_generation_settings(model: torch.nn.Module) -> list[str]:
    """``field=value`` for each setting of ``model.generation_config`` that ``generate`` would apply and this sampler
    would not (empty: the two sample the same distribution)."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    default = GenerationConfig()
    return [
        f"{field}={getattr(config, field)!r}"
        for field in UNREPRODUCED_GENERATION_FIELDS
        if getattr(config, field, None) != getattr(default, field, None)
    ]


def sampling_warpers(temperature: float, top_p: float):
    """transformers' warpers for temperature and top-p, in ``generate``'s order (temperature 1 / top_p 1: none)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def diverged_rows(probs: torch.Tensor) -> DivergedSamplingError:
    """The error for next-token probabilities (N, V) with inf / NaN in some row: names the first such row."""
    bad = int((~torch.isfinite(probs).all(dim=-1)).nonzero()[0])
    return DivergedSamplingError(
        f"sampling: the next-token probabilities of row {bad} contain inf or NaN: the policy diverged (its weights "
        f"give NaN/inf logits: a learning rate too large, or no grad_clip?)"
    )


def draw_tokens(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(N,) int64 tokens drawn from softmax(scores) (N, V) by inverse CDF at ``uniforms`` (N,) in [0, 1).

    Token v is drawn for u in [cdf[v-1], cdf[v]) / cdf[V-1]: with probability softmax(scores)[v]; tokens of probability
    0 (filtered by top-p) never. Raises DivergedSamplingError (a RuntimeError, as ``torch.multinomial``'s) on inf /
    NaN probabilities: the policy diverged (the trainer names the step: ``finite_guard.rollout_of_step``).
    """
    scores = scores.float()
    # softmax is finite exactly when the row's largest score is (a NaN or +inf anywhere, or every score at -inf, makes
    # it not): one max per row instead of a pass over the (N, V) probabilities
    if not bool(torch.isfinite(scores.amax(dim=-1)).all()):  # never sample from NaN
        raise diverged_rows(torch.softmax(scores, dim=-1))
    probs = torch.softmax(scores, dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    vocab = probs.shape[1]
    if bool((tokens >= vocab).any()):  # u * total rounded up to total: take the last token of positive probability
        last_positive = vocab - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
        tokens = torch.where(tokens >= vocab, last_positive, tokens)
    return tokens


@torch.no_grad()
def sample_shared_prefix(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
) -> torch.Tensor:
    """(B*n, max_new_tokens) sampled completions, prompt b's n samples in rows b*n .. b*n+n-1 (``generate``'s order),
    ``pad_token_id`` after each row's EOS.

    Args:
        input_ids, attention_mask: (B, P) left-padded prompts, each prefilled once.
        n: samples per prompt; max_new_tokens: completion length cap; temperature, top_p: the sampler (module doc).
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    warpers = sampling_warpers(temperature, top_p)
    cache_arg = cache_argument(model)
    if cache_arg is None:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache argument")
    rows = input_ids.shape[0] * n
    device = input_ids.device
    # written in place by the prefill, then by each decode step (kv_cache.py: no per-step copy of the whole cache)
    cache = preallocated_cache(model.config, capacity=input_ids.shape[1] + max_new_tokens)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    cache.batch_repeat_interleave(n)
    mask = attention_mask.repeat_interleave(n, dim=0)
    position = mask.long().sum(dim=1)  # the next token's position: the prompt's real length
    completion = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)  # rows still sampling, in the order of the cache's batch
    for step in range(max_new_tokens):
        uniforms = torch.rand(rows, dtype=torch.float64).to(device)  # every row, every step (module doc)
        scores = warpers(completion[active, :step], logits)
        tokens = draw_tokens(scores, uniforms[active])
        completion[active, step] = tokens
        running = tokens != eos_token_id
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        if not bool(running.all()):  # finished rows leave the batch and stop costing decode work
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, tokens, mask, position = active[keep], tokens[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=position.unsqueeze(1),
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
        logits = out.logits[:, -1].float()
        position = position + 1
    return completion
