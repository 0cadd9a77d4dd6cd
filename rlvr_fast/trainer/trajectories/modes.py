"""The registry of ``RLVRConfig.trajectory_processing`` modes and of ``RLVRConfig.lesson_training``.

A mode is a row of flags, never a branch in the callers (``processor.TrajectoryProcessor`` reads them):

| mode          | replay | lessons | groups processed                       | lesson built from                |
|---------------|--------|---------|----------------------------------------|----------------------------------|
| off           | -      | -       | none (today's step, bit for bit)       | -                                |
| replay        | yes    | -       | all-wrong groups with a stored success | -                                |
| lessons       | -      | yes     | all-wrong groups                       | the group's own failed attempts  |
| both          | yes    | yes     | all-wrong (replay if stored, else)     | the group's own failed attempts  |
| uniform       | yes    | yes     | k drawn at random (k: all-wrong count) | the group's attempts (any)       |
| random_lesson | -      | yes     | all-wrong groups                       | another problem's group          |

``both``: a processed group with a stored success of its prompt is replayed, the others get a lesson. ``uniform``: the
processing of ``both`` on k groups drawn uniformly at random (seeded per step), k the step's count of all-wrong groups;
its store keeps replay_capacity completions per group drawn at random whatever their verdict.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrajectoryMode:
    """replay: one stored trajectory of the prompt replaces one sample of a processed group. lessons: a processed group
    (not rescued by replay) is re-sampled with a lesson added to its prompt. outcome_blind: the processed groups are
    drawn at random at the rate of all-wrong groups, and the store keeps completions whatever their verdict (the
    ``uniform`` control). foreign_lesson: the lesson is built from another problem's group (``random_lesson``)."""

    replay: bool
    lessons: bool
    outcome_blind: bool = False
    foreign_lesson: bool = False

    @property
    def active(self) -> bool:
        return self.replay or self.lessons


TRAJECTORY_MODES: dict[str, TrajectoryMode] = {
    "off": TrajectoryMode(replay=False, lessons=False),
    "replay": TrajectoryMode(replay=True, lessons=False),
    "lessons": TrajectoryMode(replay=False, lessons=True),
    "both": TrajectoryMode(replay=True, lessons=True),
    "uniform": TrajectoryMode(replay=True, lessons=True, outcome_blind=True),
    "random_lesson": TrajectoryMode(replay=False, lessons=True, foreign_lesson=True),
}

# lesson_training: whether the re-sampled completions train under the prompt with the lesson (on-policy for the
# lesson-conditioned policy) or without it (off-policy: importance-weighted against the lesson-conditioned sampling)
LESSON_TRAINING: dict[str, bool] = {"without": False, "with": True}


def off_policy_rows(cfg) -> bool:
    """Whether the run trains rows sampled by another policy (replayed successes, or lessons trained without the
    lesson): those rows carry importance weights through the loss mask (``weights``)."""
    mode = TRAJECTORY_MODES[cfg.trajectory_processing]
    return mode.replay or (mode.lessons and not LESSON_TRAINING[cfg.lesson_training])
