"""Scoring a rollout: the configured reward modes (a weighted sum), the verifier's verdict kept apart from the reward
(docs/design.md §5: c_i is never changed by a reward mode), the difficulty filter and the group advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_fast.ops.group_advantage import GroupAdvantages, group_advantages
from rlvr_fast.rewards import REWARD_MODES, FilterResult, compose, filter_groups, reward_fn
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.data import Problem


@dataclass
class Scores:
    rewards: torch.Tensor  # (N,) float32, the weighted sum
    correct: torch.Tensor  # (N,) bool, the verifier's verdict
    components: dict[str, list[float]]  # each mode's raw reward
    advantages: GroupAdvantages
    filtered: FilterResult
    reward_errors: int  # samples a user reward function failed on (handled by its policy)


class Scorer:
    def __init__(self, cfg: RLVRConfig):
        unknown = sorted(set(cfg.rewards) - set(REWARD_MODES))
        if unknown:
            raise ValueError(f"RLVRConfig.rewards: unknown reward modes {unknown}; known: {sorted(REWARD_MODES)}")
        stray = sorted(set(cfg.reward_params) - set(cfg.rewards))
        if stray:
            raise ValueError(f"RLVRConfig.reward_params has parameters for modes not in rewards: {stray}")
        terms = []
        for name, weight in cfg.rewards.items():
            params = dict(cfg.reward_params.get(name, {}))
            if "seed" in REWARD_MODES[name].defaults:
                params.setdefault("seed", cfg.seed)  # every seeded mode follows the run's seed unless told otherwise
            terms.append((weight, reward_fn(name, **params)))
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
        return ctx

    def __call__(self, texts: list[str], problems: list[Problem], step: int) -> Scores:
        cfg = self.cfg
        answers = [p.answer for p in problems for _ in range(cfg.group_size)]
        ctx = self.context(problems, step)
        components = self.reward.components(texts, answers, **ctx)
        total = [0.0] * len(texts)
        for name, weight, _ in self.reward.terms:
            for i, r in enumerate(components[name]):
                total[i] += weight * r
        rewards = torch.tensor(total, dtype=torch.float32)
        correct = torch.tensor(self.verifier(texts, answers), dtype=torch.float32) > 0.5
        adv = group_advantages(
            rewards,
            cfg.group_size,
            estimator=cfg.estimator,
            scale=cfg.scale,
            eps=cfg.adv_eps,
            lam=cfg.lam,
            sample_mode=cfg.sample_mode,
            correct=correct,
        )
        filtered = filter_groups(
            rewards,
            correct,
            group_size=cfg.group_size,
            drop_all_equal=cfg.filter_all_equal,
            p_min=cfg.min_solve_rate,
            p_max=cfg.max_solve_rate,
        )
        return Scores(rewards, correct, components, adv, filtered, len(self.reward.errors))
