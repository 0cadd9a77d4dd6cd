"""rlvr_fast's sample modes and advantage estimators as options of the patched TRL trainer.

TRL computes one advantage per completion in ``_generate_and_score_completions`` (rewards weighted and summed, then
centred and scaled per ``scale_rewards``). ``AdvantageOptions`` changes that number, and nothing else, before the batch
is split into micro-batches:

- ``sample_mode`` (Zhu et al. 2025, arXiv:2506.01347): "positive_only" trains on A' = max(A, 0) (positive-sample
  reinforcement: completions better than their group only), "negative_only" on A' = min(A, 0) (negative-sample
  reinforcement), "all" leaves A alone.
- ``estimator``: None keeps TRL's own advantage (scale_rewards, multi_objective_aggregation honoured); a name of
  ``rlvr_fast.ops.group_advantage.ESTIMATORS`` recomputes it with ``group_advantages`` from the rewards TRL computed:
  "grpo" (scale = TRL's scale_rewards, eps 1e-4 as TRL: the same numbers as TRL's), "dr_grpo", "rloo", and the
  uncentred REINFORCE objectives on the verifier's verdict c_i of Zhu et al.: "psr" (A = c), "nsr" (A = c - 1) and
  "w_reinforce" (A = lam if c else -1). The verdict is ``reward > 0.5`` of the reward function named ``verifier``
  (for instance ``trl_reward_func("correct")``, named "rlvr_fast_correct"), kept apart from the reward that is trained
  on, so a reward mode never changes c_i.

Completions every reward function returned None for (TRL's "unscorable") keep advantage 0, as in TRL. The sample mode
applies after the estimator, as in ``group_advantages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODES, group_advantages

TRL_ADV_EPS = 1e-4  # TRL divides by std + 1e-4


@dataclass(frozen=True)
class AdvantageOptions:
    """How the patched trainer turns TRL's rewards into advantages (module doc). The default changes nothing."""

    estimator: str | None = None
    sample_mode: str = "all"
    lam: float = 0.1  # w_reinforce's weight on correct completions (Zhu et al. use 0.1)
    verifier: str | None = None  # the reward function (its TRL name) whose reward > 0.5 is the verdict c_i

    @property
    def changes_advantages(self) -> bool:
        return self.estimator is not None or self.sample_mode != "all"

    def validate(self, trainer: Any | None = None) -> AdvantageOptions:
        """Check the options, and against the trainer's reward functions and config when given."""
        if self.sample_mode not in SAMPLE_MODES:
            raise ValueError(f"sample_mode must be one of {sorted(SAMPLE_MODES)}, got {self.sample_mode!r}")
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(
                f"estimator must be None (TRL's advantages) or one of {sorted(ESTIMATORS)}, got {self.estimator!r}"
            )
        needs_verdict = self.estimator is not None and ESTIMATORS[self.estimator].needs_correct
        if needs_verdict and self.verifier is None:
            raise ValueError(
                f"estimator={self.estimator!r} trains on the verifier's verdict c_i: pass verifier=<name of the reward "
                f"function whose reward > 0.5 means correct>, e.g. verifier='rlvr_fast_correct'"
            )
        if self.verifier is not None and self.estimator is None:
            raise ValueError("verifier is only read by an estimator; pass estimator= too, or drop verifier")
        if trainer is None:
            return self
        if self.verifier is not None and self.verifier not in trainer.reward_func_names:
            raise ValueError(
                f"verifier={self.verifier!r} is not one of the trainer's reward functions {trainer.reward_func_names}"
            )
        if self.estimator is not None:
            args = trainer.args
            if args.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError(
                    f"estimator={self.estimator!r} recomputes the advantage from the weighted sum of the rewards, so "
                    f"GRPOConfig.multi_objective_aggregation={args.multi_objective_aggregation!r} would be ignored; "
                    f"use 'sum_then_normalize' or estimator=None"
                )
            accepted = ESTIMATORS[self.estimator].scales
            if args.scale_rewards not in accepted:
                raise ValueError(
                    f"estimator={self.estimator!r} has its own normalisation and accepts GRPOConfig.scale_rewards in "
                    f"{list(accepted)}, got {args.scale_rewards!r} (set scale_rewards='none' to confirm)"
                )
        return self


def recompute_advantages(
    options: AdvantageOptions,
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    reward_func_names: list[str],
    group_size: int,
    scale_rewards: str,
    local_advantages: torch.Tensor,
    process_index: int,
    backend: str = "auto",
) -> torch.Tensor:
    """This process's advantages under ``options``.

    rewards_per_func: (N, F) rewards of every process's completions (NaN where a function returned None), as TRL
    gathers them; local_advantages: (n,) TRL's advantages of this process's n completions (rows
    [process_index * n, (process_index + 1) * n) of the gathered batch, TRL's own slicing).
    """
    n = local_advantages.shape[0]
    rows = slice(process_index * n, (process_index + 1) * n)
    if options.estimator is None:
        return SAMPLE_MODES[options.sample_mode](local_advantages)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards = rewards.masked_fill(unscorable, float("nan"))
    correct = None
    if options.verifier is not None:
        correct = rewards_per_func[:, reward_func_names.index(options.verifier)] > 0.5  # NaN (None) -> not correct
    estimator = ESTIMATORS[options.estimator]
    result = group_advantages(
        rewards.float(),
        group_size,
        estimator=options.estimator,
        scale=scale_rewards if options.estimator == "grpo" else estimator.scales[0],
        eps=TRL_ADV_EPS,
        lam=options.lam,
        sample_mode=options.sample_mode,
        correct=correct,
        backend=backend,
        invalid="mask",  # an unscorable completion: advantage 0, left out of its group's statistics (TRL's rule)
    )
    return result.advantages[rows].to(local_advantages.device, local_advantages.dtype)
