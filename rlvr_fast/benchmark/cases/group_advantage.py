"""Benchmark cases of group_advantages: ours vs the formula TRL's GRPOTrainer computes inline.

"rlvr_fast" is the Triton kernel on CUDA (the automatic choice elsewhere); where the extension rlvr_fast._C is built,
"rlvr_fast_cuda" times the CUDA C++ kernel on the same inputs.
"""

from __future__ import annotations

import torch

from rlvr_fast.backends import cuda_unavailable_reason
from rlvr_fast.benchmark.cases.registry import Case, Floor, register
from rlvr_fast.ops.group_advantage import group_advantages


def naive_grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """What TRL's GRPOTrainer computes inline (view, mean, Bessel std, repeat_interleave, divide): the baseline."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    return (rewards - mean) / (std + eps)


GROUP_ADVANTAGE_SHAPES = [(64, 8), (512, 16), (65536, 16)]  # (prompts, G)


@register("group_advantages")
def group_advantage_cases(device: torch.device) -> list[Case]:
    backend = "triton" if device.type == "cuda" else "auto"
    with_cuda = cuda_unavailable_reason(device, "group_advantage_fwd") is None
    cases = []
    for n_groups, G in GROUP_ADVANTAGE_SHAPES:
        rewards = torch.randint(0, 2, (n_groups * G,), device=device).float()
        correct = rewards > 0
        n = rewards.numel()
        # read rewards + verdicts, write advantages + 4 per-group statistics (mean, std, solve rate, flags)
        floor = Floor(flops=6.0 * n, bytes=4.0 * n + 1.0 * n + 4.0 * n + 13.0 * n_groups)
        cases.append(
            Case(
                op="group_advantages",
                label=f"groups={n_groups} G={G}",
                impls={
                    "rlvr_fast": lambda r=rewards, c=correct, G=G: group_advantages(r, G, correct=c, backend=backend),
                    **(
                        {
                            "rlvr_fast_cuda": lambda r=rewards, c=correct, G=G: group_advantages(
                                r, G, correct=c, backend="cuda"
                            )
                        }
                        if with_cuda
                        else {}
                    ),
                    "naive_torch": lambda r=rewards, G=G: naive_grpo_advantages(r, G),
                },
                floor=floor,
                baseline="naive_torch",
                params={"n_groups": n_groups, "group_size": G},
            )
        )
    return cases
