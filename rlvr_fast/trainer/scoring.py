"""Scoring a rollout: the configured reward modes (their weighted sum, ``rewards.compose``) and the verifier's verdict,
kept apart from the reward (docs/design.md §5: c_i is never changed by a reward mode).

What the rewards become is decided after scoring, in ``trainer/advantages.py`` (group advantages, difficulty filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_fast.rewards import REWARD_MODES, compose, reward_fn
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.data import Problem
from rlvr_fast.trainer.schema import ConfigFieldError


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
        return ctx

    def __call__(self, texts: list[str], problems: list[Problem], step: int) -> Rewards:
        answers = [p.answer for p in problems for _ in range(self.cfg.group_size)]
        components = self.reward.components(texts, answers, **self.context(problems, step))
        total = torch.tensor(self.reward.weighted_sum(components), dtype=torch.float32)
        correct = torch.tensor(self.verifier(texts, answers), dtype=torch.float32) > 0.5
        return Rewards(total, correct, components, len(self.reward.errors))
