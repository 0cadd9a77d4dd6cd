"""The rollout engines ``RLVRConfig.rollout_engine`` chooses from: name -> how to check it before the model loads and
how to build it from the trainer.

- ``native``: ``HFGeneration`` (engines.py): the shared-prefix sampler with the preallocated KV cache, or
  transformers' ``generate``; reports no log-probs.
- ``vllm``: ``VLLMGeneration`` (vllm_engine.py): vLLM colocated in the training process, started from the model's
  config with the trainer's weights pushed in memory, again after every step (``sync_weights``); reports the sampled
  tokens' log-probs, which ``rollout_correction`` needs. Its engine samples in bf16 when the run computes in bf16
  (bf16 weights or bf16 autocast), else in float32. Under torchrun, one engine per rank. A LoRA policy is pushed
  merged; refused before the model loads: a temperature or eval_temperature below 0.01, top_p < 1 with a
  rollout_correction, adapter='qlora'.

The setting also takes ``auto`` (``resolve_rollout_engine``): vLLM where it is the faster engine (a CUDA device, a
supported vLLM installed, an architecture vLLM implements), else the native sampler, saying which and why. On a CPU
``auto`` is native: vLLM's CPU build samples faster (1.6-2.5x our sampler's tokens/s in bf16, 4-16 prompts x 8 x 32-1024
new tokens, benchmarks/results/rollout-engines-grid-cpu-2026-12-06.json) but its compiled engine takes ~60 s to start,
lives in its own virtualenv (another transformers) and its tokens differ from the native sampler's for a seed: a user
who wants it names it.
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
    """Settings the engine cannot honour, then the package (the settings first: they need no vLLM to be judged)."""
    from rlvr_fast.trainer.rollout.vllm_engine import VLLM_MIN_TEMPERATURE, require_vllm
    from rlvr_fast.trainer.schema import ConfigFieldError

    for field in ("temperature", "eval_temperature"):  # vLLM would sample at 0.01 instead (vllm_engine.py)
        value = getattr(cfg, field)
        if not value >= VLLM_MIN_TEMPERATURE:
            raise ConfigFieldError(
                field,
                f"RLVRConfig.{field} with rollout_engine='vllm': vLLM samples any temperature below "
                f"{VLLM_MIN_TEMPERATURE} at {VLLM_MIN_TEMPERATURE}; expected at least {VLLM_MIN_TEMPERATURE} (or "
                f"rollout_engine='native'), got {value}",
            )
    if cfg.rollout_correction is not None and cfg.top_p < 1:
        # vLLM's log-probs are of the nucleus renormalised, the trainer's of the whole vocabulary at the temperature:
        # every ratio would carry the nucleus's mass (measured: -0.69 nats a token at top_p=0.5), a bias no policy
        # change made (token_truncate: every token scaled down; sequence_truncate: the product over the completion)
        raise ConfigFieldError(
            "top_p",
            f"RLVRConfig.top_p with rollout_engine='vllm' and rollout_correction={cfg.rollout_correction!r}: the "
            "engine's log-probs are renormalised over the top-p nucleus and the trainer's are not, so the correction's "
            f"ratio would shrink by the nucleus's probability mass at every token; expected top_p=1.0 (or "
            f"rollout_correction=None), got {cfg.top_p}",
        )
    if cfg.adapter == "qlora":  # LoRA is pushed merged into its base weight; an NF4 base is packed, not a weight
        raise ConfigFieldError(
            "adapter",
            "RLVRConfig.adapter='qlora' with rollout_engine='vllm': the engine takes plain weights, and QLoRA's base "
            "layers are packed NF4; expected adapter='lora' or 'none' (or rollout_engine='native'), got 'qlora'",
        )
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
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        sleep_mode=cfg.vllm_sleep_mode,
    )


ROLLOUT_ENGINES: dict[str, RolloutEngine] = {
    "native": RolloutEngine(_check_native, _build_native, logprobs=False),
    "vllm": RolloutEngine(_check_vllm, _build_vllm, logprobs=True),
}

ROLLOUT_ENGINE_SETTINGS = ("auto", *ROLLOUT_ENGINES)
"""What ``RLVRConfig.rollout_engine`` accepts: an engine's name, or ``auto``."""


def runs_on_cuda(cfg) -> bool:
    """Whether the run's ``device`` setting puts it on CUDA here."""
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def resolve_rollout_engine(cfg, model: torch.nn.Module | None = None) -> tuple[str, str]:
    """(engine name, why) for ``cfg.rollout_engine``: a named engine is itself; ``auto`` is ``vllm`` when the run is
    on CUDA and vLLM imports at a supported version (and, given the loaded ``model``, implements its architecture),
    else ``native``. Before the model loads (preflight) pass no model; the trainer resolves again with it."""
    if cfg.rollout_engine != "auto":
        return cfg.rollout_engine, "rollout_engine"
    if not runs_on_cuda(cfg):
        return "native", (
            "auto: no CUDA device; on a CPU the native sampler needs no engine start (vLLM's compiled CPU engine takes "
            "~60 s); set rollout_engine='vllm' for vLLM's faster CPU rollout"
        )
    from rlvr_fast.trainer.rollout.vllm_engine import require_vllm, unsupported_architecture

    try:
        vllm = require_vllm()
    except ImportError as exc:
        return "native", f"auto: vLLM is not usable here ({exc})"
    if model is not None:
        arch = unsupported_architecture(model)
        if arch is not None:
            return "native", f"auto: vLLM {vllm.__version__} does not implement the architecture {arch}"
    return "vllm", f"auto: a CUDA device and vLLM {vllm.__version__}"
