"""The rollout engines ``RLVRConfig.rollout_engine`` chooses from: name -> how to check it before the model loads and
how to build it from the trainer.

- ``native``: ``HFGeneration`` (engines.py): the shared-prefix sampler with the preallocated KV cache, or
  transformers' ``generate``; reports no log-probs.
- ``vllm``: ``VLLMGeneration`` (vllm_engine.py): vLLM colocated in the training process, started from the model's
  config with the trainer's weights pushed in memory, again after every step (``sync_weights``); reports the sampled
  tokens' log-probs, which ``rollout_correction`` needs. Its engine samples in bf16 when the run computes in bf16
  (bf16 weights or bf16 autocast), else in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RolloutEngine:
    """One engine: ``check(cfg)`` raises before the model loads (a missing package, a setting it cannot honour);
    ``build(trainer)`` returns the ``GenerationBackend``; ``logprobs``: whether its rollouts carry
    ``rollout_logprobs``."""

    check: Callable
    build: Callable
    logprobs: bool


def _check_native(cfg) -> None:
    return None


def _build_native(trainer):
    from rlvr_fast.trainer.rollout.engines import HFGeneration

    cfg = trainer.cfg
    return HFGeneration(
        trainer.model,
        trainer.tokenizer,
        cfg.max_prompt_length,
        prefix_sharing=cfg.prefix_sharing,
        precision=trainer.precision,
    )


def _check_vllm(cfg) -> None:
    from rlvr_fast.trainer.rollout.vllm_engine import require_vllm
    from rlvr_fast.trainer.schema import ConfigFieldError

    try:
        require_vllm()
    except ImportError as exc:
        raise ConfigFieldError("rollout_engine", f"RLVRConfig.rollout_engine='vllm': {exc}") from None


def _build_vllm(trainer):
    from rlvr_fast.trainer.rollout.vllm_engine import VLLMGeneration

    cfg = trainer.cfg
    return VLLMGeneration(
        trainer.model,
        trainer.tokenizer,
        cfg.max_prompt_length,
        cfg.max_completion_length,
        dtype="bfloat16" if trainer.precision.compute == torch.bfloat16 else "float32",
        seed=cfg.seed,
        kv_cache_gib=cfg.vllm_kv_cache_gib,
        enforce_eager=cfg.vllm_enforce_eager,
    )


ROLLOUT_ENGINES: dict[str, RolloutEngine] = {
    "native": RolloutEngine(_check_native, _build_native, logprobs=False),
    "vllm": RolloutEngine(_check_vllm, _build_vllm, logprobs=True),
}
