"""The report section of the hard-problem arms: damage to skills the model had, and shortcut signatures.

A hard-problem run is a run of a ``difficulty`` arm with ``max_solve_rate`` set (``hard_only``: it trains only on the
groups its model solves at most 1 time in 8). It trains on those problems but is evaluated on the study's normal
held-out problems, the ones every arm is evaluated on, so a drop there is damage to skills the base model had. Per
hard run (and, as the control, the baseline run of the same seed when it shares the evaluation):

- pass@k on the held-out problems before (the base model) and after, with the paired difference and its 95% interval
  (normal over problems, ``study.stats.pass_at_k_deltas``);
- the shortcut signatures of ``rlvr_fast.eval.shortcuts`` on the same held-out completions before and after, with
  paired differences over problems. Answer repetition needs the per-completion answers (the study's evaluations keep
  them: ``eval_calibration``); the length and answer-only signatures need the completions' texts, used when the
  evaluation kept them (``per_completion["text"]``). Without texts, answer-only falls back to the frequency of the
  ``bare_number`` format class (just the number) when the study tracks it, over completions (Wilson), not paired.

The numbers are written to ``shortcuts.json`` next to the report.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rlvr_fast.eval.shortcuts import paired_difference, per_problem_signatures, summarize
from rlvr_fast.study.arms import BASELINE_ARM
from rlvr_fast.study.plan import RunSpec, StudyPlan, base_eval_path
from rlvr_fast.study.state import json_safe, write_json_atomic
from rlvr_fast.study.stats import before_after_pass_at_k, wilson

__all__ = ["SHORTCUTS_JSON", "hard_runs", "shortcut_findings", "shortcuts_section"]

SHORTCUTS_JSON = "shortcuts.json"
ANSWER_ONLY_CLASS = "bare_number"  # the study's format class for a completion that is just the number
LABELS = {
    "all_same": "groups all giving one answer",
    "all_same_wrong": "groups all giving one wrong answer",
    "modal_share": "mean share of the modal answer",
    "short": "completions under half the reference working",
    "answer_only": "answer-only completions",
}


def hard_runs(plan: StudyPlan) -> list[RunSpec]:
    """The runs that train on rarely solved problems: a ``difficulty`` arm with ``max_solve_rate`` set."""
    return [
        r for r in plan.runs if plan.arms[r.arm].group == "difficulty" and r.config.get("max_solve_rate") is not None
    ]


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _base_eval(plan: StudyPlan, spec: RunSpec) -> dict | None:
    # a multi-cell study keeps each cell's base evaluations under the cell's folder
    root = plan.base_dir(spec) if hasattr(plan, "base_dir") else plan.output_dir
    return _read(base_eval_path(root, spec.eval_key))


def _steps(spec: RunSpec) -> list[int | None] | None:
    """Operations per held-out problem (the reference working), None where the task does not say."""
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.rollout.data import load_problems

    try:
        _, problems = load_problems(RLVRConfig.from_dict(dict(spec.config)))
    except (ValueError, OSError):  # the data moved since the run: the length signature is left out, nothing else
        return None
    steps = [p.extra.get("steps") for p in problems]
    return steps if any(isinstance(s, int) and s > 0 for s in steps) else None


def _training(spec: RunSpec) -> dict:
    """What the run trained on, from its metrics: groups seen, kept by the filter, and completions updated (a group
    the filter keeps still gives no gradient when its rewards are all equal, e.g. solved by none of its samples)."""
    path = os.path.join(spec.run_dir, "metrics.jsonl")
    steps = []
    if os.path.exists(path):
        with open(path) as f:
            steps = [m for m in (json.loads(line) for line in f if line.strip()) if "reward_mean" in m]
    seen = len(steps) * spec.config["prompts_per_step"]
    removed = sum(sum((m.get("groups_filtered") or {}).values()) for m in steps)
    return {
        "steps": len(steps),
        "groups_seen": seen,
        "groups_kept": seen - removed,
        "completions_updated": sum(int(m.get("completions_updated", 0)) for m in steps),
        "max_solve_rate": spec.config.get("max_solve_rate"),
        # the training rollouts' answer-only share, first and last step (the study tracks format classes per step)
        "answer_only_rollouts": [
            ((m.get("formats") or {}).get(ANSWER_ONLY_CLASS) or {}).get("frequency") for m in steps[:1] + steps[-1:]
        ]
        if steps and ANSWER_ONLY_CLASS in (steps[0].get("formats") or {})
        else None,
    }


def _signatures(ev: dict, steps: list[int | None] | None) -> dict[str, list] | None:
    pc = ev.get("per_completion")
    if not pc or "answer" not in pc:
        return None
    texts = pc.get("text")
    if texts is not None and steps is not None and len(steps) * ev["n"] != len(texts):
        steps = None  # not the problems this evaluation answered
    return per_problem_signatures(ev["n"], answers=pc["answer"], texts=texts, correct=pc.get("correct"), steps=steps)


def _format_share(ev: dict, name: str) -> dict | None:
    stats = (ev.get("formats") or {}).get(name)
    if not stats:
        return None
    total = ev["n"] * len(ev["correct_counts"])
    low, high = wilson(int(stats["count"]), total)
    return {"value": stats["frequency"], "ci_low": low, "ci_high": high, "completions": total}


def _one(plan: StudyPlan, spec: RunSpec, role: str) -> dict:
    entry: dict[str, Any] = {"run": spec.key, "arm": spec.arm, "role": role}
    base = _base_eval(plan, spec)
    after = _read(os.path.join(spec.run_dir, "eval_after.json"))
    if base is None or after is None:
        entry["missing"] = "no base evaluation" if base is None else "no evaluation after training"
        return entry
    entry["training"] = _training(spec)
    entry["pass_at_k"] = before_after_pass_at_k(base, after)
    steps = _steps(spec)
    before_sig, after_sig = _signatures(base, steps), _signatures(after, steps)
    signatures: dict[str, dict] = {}
    if before_sig is not None and after_sig is not None:
        b_sum, a_sum = summarize(before_sig), summarize(after_sig)
        for name in before_sig.keys() & after_sig.keys():
            signatures[name] = {
                "before": b_sum[name],
                "after": a_sum[name],
                "delta": paired_difference(before_sig[name], after_sig[name]),
                "source": "held-out completions, paired over problems",
            }
    if "answer_only" not in signatures:
        b, a = _format_share(base, ANSWER_ONLY_CLASS), _format_share(after, ANSWER_ONLY_CLASS)
        if b is not None and a is not None:
            signatures["answer_only"] = {
                "before": b,
                "after": a,
                "source": f"format class {ANSWER_ONLY_CLASS!r} over held-out completions (Wilson, unpaired)",
            }
    entry["signatures"] = signatures
    entry["not_measured"] = sorted(set(LABELS) - set(signatures))
    return entry


def shortcut_findings(plan: StudyPlan, state: dict) -> dict:
    """run key -> its pass@k and signatures before/after (``_one``), for every finished hard run and its control."""
    done = {k for k, e in state.get("runs", {}).items() if e.get("status") == "done"}
    by_key = {r.key: r for r in plan.runs}
    out: dict[str, dict] = {}
    for spec in hard_runs(plan):
        if spec.key not in done:
            out[spec.key] = {"run": spec.key, "arm": spec.arm, "role": "hard", "missing": "not finished"}
            continue
        out[spec.key] = _one(plan, spec, "hard")
        control = by_key.get(spec.key.replace(f"{spec.arm}/", f"{BASELINE_ARM}/", 1))
        if control is not None and control.key in done and control.eval_key == spec.eval_key:
            out.setdefault(control.key, _one(plan, control, "control"))
    return out


def _num(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _with_ci(d: dict, key: str) -> str:
    v = d.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{v:+.3f}" if key == "delta" else _num(v)
    sign = "+" if key == "delta" else ""
    return f"{v:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def _verdict(d: dict, rise: str, fall: str) -> str:
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "no interval"
    return rise if lo > 0 else fall if hi < 0 else "no detectable change"


def _run_lines(e: dict) -> list[str]:
    title = f"### `{e['run']}`" + (" (control: the baseline arm, same seed)" if e["role"] == "control" else "")
    if "missing" in e:
        return [title, "", f"Not reported: {e['missing']}.", ""]
    t = e["training"]
    lines = [
        title,
        "",
        f"Trained {t['steps']} steps: kept {t['groups_kept']} of {t['groups_seen']} groups ("
        + (f"max_solve_rate {t['max_solve_rate']}" if t["max_solve_rate"] is not None else "no solve-rate filter")
        + f"), {t['completions_updated']} completions updated."
        + (
            " It never updated: any change below is not from hard problems."
            if e["role"] == "hard" and not t["completions_updated"]
            else ""
        )
        + (
            f" Training rollouts in the `{ANSWER_ONLY_CLASS}` format class: {_num(t['answer_only_rollouts'][0])} at "
            f"the first step, {_num(t['answer_only_rollouts'][-1])} at the last."
            if t["answer_only_rollouts"]
            else ""
        ),
        "",
    ]
    lines += ["| k | pass@k before (base) | after | paired difference | |", "|---|---|---|---|---|"]
    for k, row in sorted(e["pass_at_k"].items()):
        d = row["delta"]
        lines.append(
            f"| {k} | {_with_ci(row['before'], 'mean')} | {_with_ci(row['after'], 'mean')} | {_with_ci(d, 'delta')} "
            f"| {_verdict(d, 'improved', 'worsened (damage)')} |"
        )
    lines += ["", "| shortcut signature | before | after | paired difference | |", "|---|---|---|---|---|"]
    for name, label in LABELS.items():
        s = e["signatures"].get(name)
        if s is None:
            continue
        d = s.get("delta")
        verdict = _verdict(d, "rose", "fell") if d else s["source"]
        lines.append(
            f"| {label} | {_with_ci(s['before'], 'value')} | {_with_ci(s['after'], 'value')} | "
            f"{_with_ci(d, 'delta') if d else 'n/a'} | {verdict} |"
        )
    if e["not_measured"]:
        lines.append(
            "\nNot measured: "
            + ", ".join(LABELS[n] for n in e["not_measured"])
            + " (they need the held-out completions' texts, verdicts or the problems' operation counts)."
        )
    return [*lines, ""]


def shortcuts_section(plan: StudyPlan, state: dict) -> list[str]:
    """The report lines of the hard-problem arms (empty when the study has none); writes ``shortcuts.json``."""
    if not hard_runs(plan):
        return []
    findings = shortcut_findings(plan, state)
    write_json_atomic(os.path.join(plan.output_dir, SHORTCUTS_JSON), json_safe(findings))
    lines = [
        "## Hard problems: damage to skills the model had, and shortcut signatures",
        "",
        "The hard arms train only on groups their model almost never solves, and are evaluated on the same held-out "
        "problems as every arm: a pass@k drop there is damage to a skill the base model had. A rise in answer "
        "repetition (especially of one wrong answer), in completions far shorter than a worked solution, or in "
        "answer-only outputs is the shortcut the hard problems would teach. Intervals are 95%, paired over problems. "
        f"Numbers: [`{SHORTCUTS_JSON}`]({SHORTCUTS_JSON}).",
        "",
    ]
    for e in findings.values():
        lines += _run_lines(e)
    return lines
