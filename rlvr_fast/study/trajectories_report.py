"""The report section of the trajectory-processing arms: what each mode cost and whether the asymmetric one helps.

A trajectory run is a run whose config sets ``trajectory_processing`` (``traj_replay``, ``traj_lessons``, ``traj_both``
and the controls ``traj_uniform``, ``traj_random_lesson``); the baseline arm of the same seed (``trajectory_processing:
off``) is the reference. Per run, from its metrics:

- what it trained: steps (a lesson samples G more completions per processed group, so at equal ``rollout_budget`` the
  lesson arms train fewer steps), completions sampled in all and beyond the baseline's, prompt tokens the lessons
  added, all-wrong groups and the share rescued (they gained signal), replayed and lesson samples, the mean hint
  reliance and the mean shaped importance weight f(r) of the off-policy tokens;
- pass@k on the held-out problems before (the base model) and after, with the paired difference (95%, normal over
  problems, ``study.stats.pass_at_k_deltas``).

Then the comparisons the research asks for, each a paired difference of two runs' evaluations after training on the
same problems (same seed, same evaluation setting): ``both`` - ``uniform`` (does treating successes and failures
differently beat processing them alike?), ``both`` - the baseline, ``lessons`` - ``random_lesson`` (does the lesson's
content matter, or only its presence?). The numbers are written to ``trajectories.json`` next to the report.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rlvr_fast.study.arms import BASELINE_ARM
from rlvr_fast.study.plan import RunSpec, StudyPlan, base_eval_path
from rlvr_fast.study.shortcuts_report import _verdict, _with_ci  # the same interval formatting
from rlvr_fast.study.state import json_safe, write_json_atomic
from rlvr_fast.study.stats import before_after_pass_at_k, pass_at_k_deltas

__all__ = ["COMPARISONS", "TRAJECTORIES_JSON", "trajectories_section", "trajectory_findings", "trajectory_runs"]

TRAJECTORIES_JSON = "trajectories.json"
# (minuend mode, subtrahend mode, the question): "off" is the baseline arm of the same seed
COMPARISONS = (
    (
        "both",
        "uniform",
        "asymmetric processing (successes replayed, failures turned into lessons) vs the same "
        "processing regardless of outcome",
    ),
    ("both", "off", "the asymmetric mode vs plain GRPO"),
    ("lessons", "random_lesson", "a lesson from the problem's own failures vs one from another problem"),
    ("replay", "off", "replayed successes vs plain GRPO"),
)


def _mode(spec: RunSpec) -> str:
    return spec.config.get("trajectory_processing") or "off"


def trajectory_runs(plan: StudyPlan) -> list[RunSpec]:
    """The runs that process trajectories (``trajectory_processing`` other than off)."""
    return [r for r in plan.runs if _mode(r) != "off"]


def _read(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _steps(spec: RunSpec) -> list[dict]:
    path = os.path.join(spec.run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [m for m in (json.loads(line) for line in f if line.strip()) if "reward_mean" in m]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _training(spec: RunSpec) -> dict:
    """What the run sampled and trained, summed (or averaged) over its step records."""
    steps = _steps(spec)
    per_step = spec.config["prompts_per_step"] * spec.config["group_size"]
    sampled = sum(int(m.get("completions_sampled", per_step)) for m in steps)
    all_wrong = sum(int(m.get("traj_all_wrong_groups", 0)) for m in steps)
    rescued = sum(int(m.get("traj_groups_rescued", 0)) for m in steps)
    return {
        "steps": len(steps),
        "completions_sampled": sampled,
        "extra_completions": sampled - len(steps) * per_step,  # beyond one rollout per step: the lessons' re-samples
        "prompt_tokens_added": sum(int(m.get("traj_prompt_tokens_added", 0)) for m in steps),
        "completion_tokens": sum(float(m.get("completion_tokens", 0.0)) for m in steps),
        "all_wrong_groups": all_wrong,
        "groups_processed": sum(int(m.get("traj_groups_processed", 0)) for m in steps),
        "groups_rescued": rescued,
        "rescued_share": rescued / all_wrong if all_wrong else None,
        "replayed_samples": sum(int(m.get("traj_replayed_samples", 0)) for m in steps),
        "lesson_samples": sum(int(m.get("traj_lesson_samples", 0)) for m in steps),
        "hint_reliance_mean": _mean([m.get("traj_hint_reliance") for m in steps]),
        "is_weight_mean": _mean([m.get("traj_is_weight_mean") for m in steps]),
        "seconds": sum(float(m.get("seconds", 0.0)) for m in steps),
    }


def _evals(plan: StudyPlan, spec: RunSpec) -> tuple[dict | None, dict | None]:
    root = plan.base_dir(spec) if hasattr(plan, "base_dir") else plan.output_dir
    return _read(base_eval_path(root, spec.eval_key)), _read(os.path.join(spec.run_dir, "eval_after.json"))


def _one(plan: StudyPlan, spec: RunSpec) -> dict:
    entry: dict[str, Any] = {"run": spec.key, "arm": spec.arm, "mode": _mode(spec), "seed": spec.seed_index}
    base, after = _evals(plan, spec)
    if base is None or after is None:
        entry["missing"] = "no base evaluation" if base is None else "no evaluation after training"
        return entry
    entry["training"] = _training(spec)
    entry["pass_at_k"] = before_after_pass_at_k(base, after)
    return entry


def trajectory_findings(plan: StudyPlan, state: dict) -> dict:
    """{"runs": run key -> ``_one``, for every finished trajectory run and its seed's baseline run; "comparisons": a
    list of paired differences after training (``COMPARISONS``, where both runs of a seed finished)}."""
    done = {k for k, e in state.get("runs", {}).items() if e.get("status") == "done"}
    runs = trajectory_runs(plan)
    baselines = [r for r in plan.runs if r.arm == BASELINE_ARM and _mode(r) == "off"]
    out: dict[str, Any] = {"runs": {}, "comparisons": []}
    for spec in baselines + runs:
        out["runs"][spec.key] = (
            _one(plan, spec) if spec.key in done else {"run": spec.key, "arm": spec.arm, "missing": "not finished"}
        )
    by_mode_seed = {(_mode(r), r.seed_index): r for r in baselines + runs if r.key in done}
    for a, b, question in COMPARISONS:
        for (mode, seed), spec_a in sorted(by_mode_seed.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            spec_b = by_mode_seed.get((b, seed))
            if mode != a or spec_b is None or spec_a.eval_key != spec_b.eval_key:
                continue
            after_a, after_b = _evals(plan, spec_a)[1], _evals(plan, spec_b)[1]
            deltas = pass_at_k_deltas(after_b, after_a)  # a - b, paired over the same held-out problems
            out["comparisons"].append(
                {"a": spec_a.key, "b": spec_b.key, "modes": [a, b], "seed": seed, "question": question, "delta": deltas}
            )
    return out


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


def trajectories_section(plan: StudyPlan, state: dict) -> list[str]:
    """The report lines of the trajectory-processing arms (empty when the study has none); writes
    ``trajectories.json``."""
    if not trajectory_runs(plan):
        return []
    findings = trajectory_findings(plan, state)
    write_json_atomic(os.path.join(plan.output_dir, TRAJECTORIES_JSON), json_safe(findings))
    budget = {r.config.get("rollout_budget") for r in trajectory_runs(plan)}
    lines = [
        "## Trajectory processing: successes as demonstrations, failures as lessons",
        "",
        "Each processing arm rebuilds the step's all-wrong groups (a replayed success of the prompt, or the group "
        "sampled again with a lesson from its failures); `uniform` applies the same processing to groups drawn "
        "regardless of outcome and `random_lesson` takes the lesson from another problem: the controls. "
        + (
            f"Every run stops once it has sampled {budget.pop()} completions (`rollout_budget`): a lesson costs G "
            "more completions, so the lesson arms train fewer steps. "
            if len(budget) == 1 and None not in budget
            else "The runs do not share a generation budget: compare the completions sampled. "
        )
        + f"Intervals are 95%, paired over held-out problems. Numbers: [`{TRAJECTORIES_JSON}`]({TRAJECTORIES_JSON}).",
        "",
        "| run | steps | completions sampled (extra) | prompt tokens added | all-wrong groups | rescued | replayed | "
        "lesson samples | hint reliance (nats/token) | mean f(r) | pass@1 before -> after | paired difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in findings["runs"].values():
        if "missing" in e:
            lines.append(f"| `{e['run']}` | {e['missing']} |" + " |" * 10)
            continue
        t, p1 = e["training"], e["pass_at_k"][1]
        lines.append(
            f"| `{e['run']}` | {t['steps']} | {t['completions_sampled']} ({t['extra_completions']:+d}) | "
            f"{t['prompt_tokens_added']} | "
            + (  # the off arm logs no trajectory metrics: its all-wrong groups are not counted
                f"{t['all_wrong_groups']} | {t['groups_rescued']} ({_num(t['rescued_share'], '.0%')}) | "
                if e["mode"] != "off"
                else "n/a | n/a | "
            )
            + f"{t['replayed_samples']} | {t['lesson_samples']} | "
            f"{_num(t['hint_reliance_mean'], '+.3f')} | {_num(t['is_weight_mean'])} | "
            f"{_with_ci(p1['before'], 'mean')} -> {_with_ci(p1['after'], 'mean')} | {_with_ci(p1['delta'], 'delta')} |"
        )
    lines.append("")
    if findings["comparisons"]:
        lines += [
            "| comparison (after training, paired) | seed | pass@1 difference | pass@k at the largest k | verdict |",
            "|---|---|---|---|---|",
        ]
        for c in findings["comparisons"]:
            a, b = c["modes"]
            k = max(c["delta"])
            d1, dk = c["delta"][1], c["delta"][k]
            lines.append(
                f"| `{c['a']}` - `{c['b']}`: {c['question']} | {c['seed']} | {_with_ci(d1, 'delta')} | "
                f"k={k}: {_with_ci(dk, 'delta')} | {_verdict(d1, f'{a} better', f'{b} better')} |"
            )
        lines.append("")
    else:
        lines += ["No comparison: the runs it needs (same seed, same evaluation) have not all finished.", ""]
    return lines
