"""Rewards: answer extraction, equivalence checking, reward modes by name, their weighted composition, and difficulty
filters (docs/design.md §§5-6). Plain Python: usable without the trainer or a GPU."""

from rlvr_fast.rewards.compose import (
    ON_ERROR_POLICIES,
    ComposedReward,
    GuardedReward,
    RewardError,
    RewardFunctionError,
    compose,
    guard,
)
from rlvr_fast.rewards.equivalence import Number, is_equivalent, normalize_answer, parse_number, symbolic_available
from rlvr_fast.rewards.extract import extract_answer, extract_boxed, has_nonempty_boxed
from rlvr_fast.rewards.filters import FILTER_RULES, FilterResult, filter_groups
from rlvr_fast.rewards.modes import (
    REWARD_MODES,
    RewardFunction,
    RewardMode,
    brier_reward,
    majority_vote,
    numeric_continuous_reward,
    parse_confidence,
    register_mode,
    reward_fn,
)

__all__ = [
    "FILTER_RULES",
    "ON_ERROR_POLICIES",
    "REWARD_MODES",
    "ComposedReward",
    "FilterResult",
    "GuardedReward",
    "Number",
    "RewardError",
    "RewardFunction",
    "RewardFunctionError",
    "RewardMode",
    "brier_reward",
    "compose",
    "extract_answer",
    "extract_boxed",
    "filter_groups",
    "guard",
    "has_nonempty_boxed",
    "is_equivalent",
    "majority_vote",
    "normalize_answer",
    "numeric_continuous_reward",
    "parse_confidence",
    "parse_number",
    "register_mode",
    "reward_fn",
    "symbolic_available",
]
