"""The stages of one training step between the rollout and the update, top to bottom.

1. **Rewards** (``Scorer``): the configured reward modes (their weighted sum, ``rewards.compose``) and the verifier's
   verdict, kept apart from the reward (docs/design.md §5: c_i is never changed by a reward mode).
2. **Advantages** (``compute_advantages``): the group advantages (``ops.group_advantages``: GRPO, Dr. GRPO, RLOO,
   PSR / NSR / W-REINFORCE, sample modes; docs/design.md §1).
3. **Filter** (``apply_difficulty_filter``): drop all-equal groups, keep solve rates in [min_solve_rate,
   max_solve_rate] (``rewards.filter_groups``; docs/design.md §6). The filter decides which groups the update sees, not
   their advantages (a dropped group keeps the advantages it had; its completions just do not enter the update batch).
4. **Update batch** (``build_update_batch``): the completions that run through the model in the policy update, and
   the normaliser of the whole step they belong to. A completion runs when its group was kept, it has tokens in the
   loss, and it can contribute a gradient: with beta == 0 a completion whose advantage is exactly 0 has none (the
   clipped surrogate is -min(rho A, clip(rho) A) = 0), so it is skipped before the decoder runs. Skipped completions
   still count in the loss's normaliser (``step_rows`` / ``step_tokens``), exactly as if they had run
   (``trainer/update/loss.py``).

``PreparedStep`` holds what the four stages produced; ``Trainer.prepare_step`` (``trainer/loop.py``) runs them, with
the data-parallel gathers between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlvr_fast.ops.group_advantage import GroupAdvantages, group_advantages
from rlvr_fast.rewards import REWARD_MODES, FilterResult, compose, filter_groups, reward_fn
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.rollout.data import Problem
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.schema import ConfigFieldError

# ---- 1. rewards ------------------------------------------------------------------------------------------------------


@dataclass
class Rewards:
    """A rollout's rewards, N = prompts x group_size completions in batch order (prompt-major)."""

    total: torch.Tensor  # (N,) float32, sum_j w_j R_j over the configured reward modes
    correct: torch.Tensor  # (N,) bool, the verifier's verdict
    components: dict[str, list[float]]  # each mode's raw reward R_j, N values each
    errors: int  # samples a user reward function failed on (handled by its failure policy)


def mode_params(cfg: RLVRConfig, name: str) -> dict:
    """The keyword parameters of reward mode ``name`` in this run: ``reward_params[name]`` (every key one the mode
    takes, else ConfigFieldError naming the mode, the keys and the known ones) and the run's seed for a seeded mode."""
    params = dict(cfg.reward_params.get(name, {}))
    known = REWARD_MODES[name].defaults
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        raise ConfigFieldError(
            "reward_params",
            f"RLVRConfig.reward_params[{name!r}]: unknown parameter(s) {unknown} of reward mode {name!r}; expected "
            f"keys from {sorted(known)}",
        )
    if "seed" in known:
        params.setdefault("seed", cfg.seed)  # every seeded mode follows the run's seed unless told otherwise
    return params


class Scorer:
    """``Scorer(cfg)(texts, problems, step) -> Rewards``; the reward modes are checked when it is built."""

    def __init__(self, cfg: RLVRConfig):
        unknown = sorted(set(cfg.rewards) - set(REWARD_MODES))
        if unknown:
            raise ConfigFieldError(
                "rewards", f"RLVRConfig.rewards: unknown reward modes {unknown}; known: {sorted(REWARD_MODES)}"
            )
        stray = sorted(set(cfg.reward_params) - set(cfg.rewards))
        if stray:
            raise ConfigFieldError(
                "reward_params",
                f"RLVRConfig.reward_params has parameters for modes not in rewards: {stray} (rewards: "
                f"{sorted(cfg.rewards)})",
            )
        terms = []
        for name, weight in cfg.rewards.items():
            params = mode_params(cfg, name)
            try:
                terms.append((weight, reward_fn(name, **params)))
            except (TypeError, ValueError) as exc:  # a parameter out of range or of the wrong type
                raise ConfigFieldError("reward_params", f"RLVRConfig.reward_params[{name!r}]: {exc}") from None
        self.reward = compose(terms)
        self.verifier = reward_fn("correct")
        self.cfg = cfg

    def context(self, problems: list[Problem], step: int) -> dict:
        """Per-completion context the reward modes read (prompt, group, step, the wrong labels when the data has
        them)."""
        g = self.cfg.group_size
        expanded = [p for p in problems for _ in range(g)]
        ctx = {"prompts": [p.prompt for p in expanded], "group_size": g, "step": step}
        if all("incorrect_answer" in p.extra for p in problems):
            ctx["incorrect_answers"] = [str(p.extra["incorrect_answer"]) for p in expanded]
        if all(p.entry is not None for p in problems):  # a generated task's own scorer (the task_score mode)
            ctx["entries"] = [p.entry for p in expanded]
        return ctx

    def __call__(self, texts: list[str], problems: list[Problem], step: int) -> Rewards:
        answers = [p.answer for p in problems for _ in range(self.cfg.group_size)]
        components = self.reward.components(texts, answers, **self.context(problems, step))
        total = torch.tensor(self.reward.weighted_sum(components), dtype=torch.float32)
        correct = torch.tensor(self.verifier(texts, answers), dtype=torch.float32) > 0.5
        return Rewards(total, correct, components, len(self.reward.errors))


# ---- 2. advantages ---------------------------------------------------------------------------------------------------


def compute_advantages(rewards: Rewards, cfg: RLVRConfig) -> GroupAdvantages:
    """Advantages of the N = groups x group_size completions (``.advantages``: (N,) float32) and the group statistics,
    with the run's estimator, scale, eps, lam and sample mode; ``psr`` / ``nsr`` / ``w_reinforce`` read the verdict."""
    return group_advantages(
        rewards.total,
        cfg.group_size,
        estimator=cfg.estimator,
        scale=cfg.scale,
        eps=cfg.adv_eps,
        lam=cfg.lam,
        sample_mode=cfg.sample_mode,
        correct=rewards.correct,
    )


# ---- 3. difficulty filter --------------------------------------------------------------------------------------------


def apply_difficulty_filter(rewards: Rewards, cfg: RLVRConfig) -> FilterResult:
    """Which groups the update keeps (``.keep``: (groups,) bool), by the run's filter_all_equal / min_solve_rate /
    max_solve_rate; the solve rate is the verifier's, never the reward's."""
    return filter_groups(
        rewards.total,
        rewards.correct,
        group_size=cfg.group_size,
        drop_all_equal=cfg.filter_all_equal,
        p_min=cfg.min_solve_rate,
        p_max=cfg.max_solve_rate,
    )


# ---- 4. update batch -------------------------------------------------------------------------------------------------


@dataclass
class UpdateBatch:
    rollout: Rollout  # the completions that run (kept by the filter, and non-zero advantage unless beta > 0)
    advantages: torch.Tensor  # (R,) float32
    loss_mask: torch.Tensor  # (R, Lc) float32
    step_rows: float  # completions of the step that count in the normaliser (kept by the filter); / world size
    step_tokens: float  # their active tokens; under data parallelism both are the whole step's / the world size
    skipped_rows: int  # kept completions skipped because A == 0 and beta == 0
    skipped_tokens: float
    old_logp: torch.Tensor | None = None  # (R, Lc) when num_iterations > 1, set by the update before its first step
    ref_logp: torch.Tensor | None = None  # (R, Lc) when beta > 0, likewise


def build_update_batch(rollout: Rollout, advantages: torch.Tensor, kept: FilterResult, cfg: RLVRConfig) -> UpdateBatch:
    """The update batch of ``rollout`` (N completions) from its advantages ((N,) float32) and the filter's verdict.

    ``cfg.mask_truncated_completions`` takes truncated completions out of the loss (and the normaliser); the old-policy
    and reference log-probs are left to the update (``Trainer.update``), which computes them once for all iterations.
    """
    loss_mask = rollout.completion_mask.float()
    if cfg.mask_truncated_completions:
        loss_mask = loss_mask * (~rollout.truncated).float()[:, None]
    in_kept_group = kept.completion_mask(cfg.group_size).to(loss_mask.device)
    advantages = advantages.to(loss_mask.device)
    counted = in_kept_group & (loss_mask.sum(dim=1) > 0)  # completions with tokens in the loss
    runs = counted & ((advantages != 0) | (cfg.beta > 0))
    skipped = counted & ~runs  # zero advantage, beta == 0: no gradient, so no forward either
    rows = runs.nonzero().squeeze(1)
    return UpdateBatch(
        rollout=rollout.select(rows),
        advantages=advantages[rows],
        loss_mask=loss_mask[rows],
        step_rows=int(in_kept_group.sum()),
        step_tokens=float(loss_mask[in_kept_group].sum()),
        skipped_rows=int(skipped.sum()),
        skipped_tokens=float(loss_mask[skipped].sum()),
    )


# ---- what the stages produced ----------------------------------------------------------------------------------------


@dataclass
class PreparedStep:
    """Everything a step computes before its update (``Trainer.prepare_step``); rewards, advantages, filter, texts and
    counts are the whole step's (all ranks'), ``rollout`` and ``batch`` this rank's."""

    rollout: Rollout
    texts: list[str]
    rewards: Rewards
    adv: GroupAdvantages
    kept: FilterResult
    batch: UpdateBatch
    batch_stats: dict  # the step's completions_updated, skipped_rows, skipped_tokens
    completion_tokens: float
    truncated: float  # completions without EOS
    trajectories: dict = field(default_factory=dict)  # trajectory processing's metrics (trainer/trajectories)
