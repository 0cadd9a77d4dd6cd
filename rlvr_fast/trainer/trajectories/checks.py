"""The settings trajectory processing cannot serve, refused before the model loads (``checks.preflight``)."""

from __future__ import annotations

from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.trajectories.lessons import load_lesson_builder
from rlvr_fast.trainer.trajectories.modes import TRAJECTORY_MODES, off_policy_rows

# loss types whose normaliser does not read the mask weights (weights.py): dapo's step token count, dr_grpo's B * L
WEIGHTABLE_LOSS_TYPES = ("dapo", "dr_grpo")
# estimators that give a verified success advantage 0 (nsr: c - 1): a rescue's successes would train nothing
SUCCESS_BLIND_ESTIMATORS = ("nsr",)


def check_trajectory_processing(cfg) -> None:
    """ConfigFieldError naming the field, the expected and the actual value for a combination the mode cannot run."""
    name = cfg.trajectory_processing
    mode = TRAJECTORY_MODES[name]

    def refuse(field: str, why: str, expected: str, got) -> None:
        raise ConfigFieldError(
            field, f"RLVRConfig.{field}: trajectory_processing={name!r} {why}; expected {expected}, got {got!r}"
        )

    if cfg.lesson_builder is not None:
        if not mode.lessons:
            refuse(
                "lesson_builder", "builds no lessons", "lesson_builder=None or a mode with lessons", cfg.lesson_builder
            )
        load_lesson_builder(cfg.lesson_builder)
    if not mode.active:
        return
    from rlvr_fast.trainer.rollout.registry import resolve_rollout_engine

    engine, _ = resolve_rollout_engine(cfg)
    if engine != "native":
        refuse(
            "rollout_engine",
            "computes behaviour log-probs and re-samples lessons with the trainer's own sampler; the vLLM engine's "
            "samples and log-probs are not wired into it",
            "rollout_engine='native'",
            cfg.rollout_engine,
        )
    if mode.foreign_lesson and cfg.prompts_per_step < 2:
        refuse(
            "prompts_per_step", "takes the lesson of another problem of the step", "at least 2", cfg.prompts_per_step
        )
    if cfg.sample_mode == "negative_only":  # replay and lessons alike: a rescue is a success, its advantage > 0
        refuse(
            "sample_mode",
            "rescues all-wrong groups with successes (replayed or sampled under a lesson), whose positive advantages "
            "sample_mode='negative_only' would zero",
            "'all' or 'positive_only'",
            cfg.sample_mode,
        )
    if cfg.estimator in SUCCESS_BLIND_ESTIMATORS:
        from rlvr_fast.ops.group_advantage import ESTIMATORS

        refuse(
            "estimator",
            f"rescues all-wrong groups with successes, to which estimator={cfg.estimator!r} gives advantage 0",
            f"one of {[e for e in ESTIMATORS if e not in SUCCESS_BLIND_ESTIMATORS]}",
            cfg.estimator,
        )
    if not off_policy_rows(cfg):
        return
    if cfg.rollout_correction is not None:
        refuse(
            "rollout_correction",
            "carries its off-policy rows' behaviour log-probs where the rollout correction reads the engine's",
            "None",
            cfg.rollout_correction,
        )
    if cfg.num_iterations != 1:
        refuse(
            "num_iterations",
            "weights off-policy tokens by LUFFY's shaped ratio through the loss mask, exact only at the first "
            "optimizer step on a rollout (the PPO ratio is 1 there, so no clip is active)",
            "1",
            cfg.num_iterations,
        )
    if cfg.loss_type not in WEIGHTABLE_LOSS_TYPES:
        refuse(
            "loss_type",
            "weights off-policy tokens through the loss mask, which grpo's per-completion and bnpo's batch mask "
            "normalisers would divide out",
            f"one of {list(WEIGHTABLE_LOSS_TYPES)}",
            cfg.loss_type,
        )
    if cfg.top_p < 1:
        refuse(
            "top_p",
            "weights off-policy tokens by pi_theta / pi_behaviour, with the behaviour log-probs of the full "
            "distribution at the run's temperature; a nucleus cut samples from another one",
            "1.0",
            cfg.top_p,
        )
    if cfg.importance_sampling != "token":
        refuse("importance_sampling", "shapes each token's ratio", "'token'", cfg.importance_sampling)
