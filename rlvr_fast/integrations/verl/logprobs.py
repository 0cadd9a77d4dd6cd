"""verl's fused log-prob paths answered by ``rlvr_fast.token_logprobs`` (verl 0.9.1).

``enable_fused_linear_logprobs()`` (or ``register(fused_linear_logprobs=True)``) replaces verl's fused log-prob paths
(``actor_rollout_ref.model.use_fused_kernels=True``): ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
(the ``triton`` backend, CUDA-only in verl) and ``FusedLinearForPPO.forward`` (the ``torch`` / ``liger`` backends)
both answer with ``rlvr_fast.token_logprobs`` (log-probs and entropy of the sampled tokens from the hidden states and
the LM head, forward and backward, temperature; never the tokens x vocab logits). ``disable_fused_linear_logprobs()``
puts verl's functions back.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from rlvr_fast.integrations.verl.compat import check_verl_version
from rlvr_fast.ops.logprobs import token_logprobs

__all__ = [
    "disable_fused_linear_logprobs",
    "enable_fused_linear_logprobs",
    "fused_linear_logprobs_enabled",
    "verl_linear_cross_entropy",
]


def verl_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``linear_cross_entropy`` (``verl.utils.kernel.linear_cross_entropy``) by ``rlvr_fast.token_logprobs``.

    Args:
        hidden: (..., D) hidden states; weight: (V, D) the LM head; labels: (...) the token ids.
        temperature: the logits are divided by it.
        reduction: "none" only (the per-token values verl's actors use).
        dist_process_group: None only (a vocabulary split over tensor-parallel ranks is not supported).

    Returns:
        (logprobs, entropy): float32 (N,) with N the number of tokens, as verl's kernel returns them; both
        differentiable w.r.t. hidden and weight.
    """
    if reduction != "none":
        raise ValueError(f"reduction: rlvr_fast's linear_cross_entropy supports 'none' only, got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError(
            "dist_process_group: rlvr_fast's linear_cross_entropy has no vocabulary-parallel (tensor-parallel LM head) "
            "mode; call disable_fused_linear_logprobs() for verl's own kernel"
        )
    logp, entropy = token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature=float(temperature),
        return_entropy=True,
    )
    return logp, entropy


def _fused_linear_for_ppo_forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
    """``FusedLinearForPPO.forward`` by ``token_logprobs``: (log_probs, entropy) in input_ids' shape, float32."""
    return token_logprobs(
        hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=float(temperature), return_entropy=True
    )


_LCE_MODULE = "verl.utils.kernel.linear_cross_entropy"
_PPO_MODULE = "verl.utils.experimental.torch_functional"
_saved: dict[tuple[str, str], Any] = {}  # (module or class path, attribute) -> verl's original, while enabled


def fused_linear_logprobs_enabled() -> bool:
    return bool(_saved)


def enable_fused_linear_logprobs() -> None:
    """Route verl's fused log-prob paths through ``token_logprobs`` (idempotent; ``disable_...`` restores them).

    Patched: ``linear_cross_entropy`` in verl's kernel module and in every imported verl module that holds it by
    ``from ... import linear_cross_entropy`` (verl's Megatron forwards; the HF forwards import it at call time, and
    modules imported later bind the patched one), and ``FusedLinearForPPO.forward``.
    """
    check_verl_version()
    if _saved:
        return
    lce = importlib.import_module(_LCE_MODULE)
    ppo = importlib.import_module(_PPO_MODULE)
    original = lce.linear_cross_entropy
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "verl" and getattr(module, "linear_cross_entropy", None) is original:
            _saved[(name, "linear_cross_entropy")] = original
            module.linear_cross_entropy = verl_linear_cross_entropy
    _saved[(f"{_PPO_MODULE}:FusedLinearForPPO", "forward")] = ppo.FusedLinearForPPO.forward
    ppo.FusedLinearForPPO.forward = _fused_linear_for_ppo_forward


def disable_fused_linear_logprobs() -> None:
    """Put verl's own fused log-prob functions back (a no-op when they were not replaced)."""
    while _saved:
        (where, attr), original = _saved.popitem()
        module_name, _, class_name = where.partition(":")
        target = sys.modules[module_name]
        setattr(getattr(target, class_name) if class_name else target, attr, original)
