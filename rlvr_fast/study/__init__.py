"""``rlvr-fast study``: does reward engineering matter for this model? A grid of short training runs from the same
base model, one per arm (reward, sample, difficulty and optimizer arms), and one report comparing them with measured
numbers and their confidence intervals.

Modules, one job each: ``arms`` (the registry of named RLVRConfig overrides), ``presets`` (quick, default, and the
presets with (model, task) cells: models-quick, models), ``plan`` (preset + arms + flags -> validated run configs, per
cell), ``state`` (atomic progress file), ``runner`` (runs the arms, resumes, records failures), ``updates`` (update
sparsity and changed-set overlaps), ``stats`` (intervals), ``analysis`` (the seven findings), ``report`` (markdown,
figures, study.json), ``predictions`` (what the research context predicts per (model kind, task kind)), ``cells``
(the comparison across cells: the lead table, prediction vs data, and the multi-cell report).
"""

from rlvr_fast.study.arms import ALIASES, ARMS, Arm, load_arms_file, register_arm
from rlvr_fast.study.plan import RunSpec, StudyPlan, plan_study
from rlvr_fast.study.presets import PRESETS, StudyCell, StudyPreset, register_preset
from rlvr_fast.study.runner import StudyOutcome, run_study

__all__ = [
    "ALIASES",
    "ARMS",
    "PRESETS",
    "Arm",
    "RunSpec",
    "StudyCell",
    "StudyOutcome",
    "StudyPlan",
    "StudyPreset",
    "load_arms_file",
    "plan_study",
    "register_arm",
    "register_preset",
    "run_study",
]
