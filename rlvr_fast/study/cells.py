"""A multi-cell study's findings across cells and its report: which rewards help which model on which task.

Per cell (``StudyPlan.cell_plan``) the single-cell analysis and report run as they are (``analysis.analyse``,
``report.write_study_report`` into ``<study>/cells/<cell>/``). On top of them, from the runs' own evaluations:

- the lead table: per cell, pass@1 after training of ``correct`` minus ``random`` and minus ``inverse``, paired by
  problem (both arms are evaluated on the cell's same held-out problems with the same sampling seeds);
- per cell, every comparison of ``predictions.COMPARISONS`` (arm - arm, arm - base) with its 95% interval, the sign
  the research context predicts for the cell's (model kind, task kind) and whether the data agree
  (``predictions.agreement``);
- per cell, the base and every run's pass@1 and pass@n, the format each run ends on, the mean token entropy of the
  policy on its rollouts at the first and the last step, and whether the task is contamination-free by construction.

Seeds: seed ``i`` of every arm is evaluated on the same problems (the split follows the run's seed), so a comparison
is paired within each seed index; over several seed indices the differences are averaged and their standard errors
combined as independent (different problem sets): se = sqrt(sum se_i^2) / S. With one seed the interval covers the
problems and the sampling, not the variation between training seeds.

``study.json`` leads with ``lead_table``, then ``cells`` (every number of the report), then the plan and the state;
each cell's full findings are in its own ``cells/<cell>/study.json``.
"""

from __future__ import annotations

import json
import math
import os
from statistics import NormalDist
from typing import Any

from rlvr_fast.study.analysis import analyse
from rlvr_fast.study.plan import StudyPlan, base_eval_path
from rlvr_fast.study.predictions import COMPARISONS, MODEL_KIND_TEXT, TASK_KIND_TEXT, agreement, predict
from rlvr_fast.study.report import (
    REPORT_FILE,
    STUDY_JSON,
    _ci,
    _dci,
    _f,
    _sanitize,
    provenance_lines,
    report_meta,
    write_study_report,
)
from rlvr_fast.study.state import write_json_atomic
from rlvr_fast.study.stats import CONFIDENCE, pass_at_k_curve_ci, pass_at_k_deltas
from rlvr_fast.trainer.evaluation.held_out import eval_dict_from_json

__all__ = ["LEAD_COMPARISONS", "analyse_cells", "cell_state", "combine_seeds", "compare", "write_cells_report"]

LEAD_COMPARISONS = ("correct - random", "correct - inverse")
FORMAT = "rlvr_fast.study_cells/1"
_Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def cell_state(plan: StudyPlan, state: dict, name: str) -> dict:
    """The study state restricted to cell ``name``, its run keys made ``<arm>/seed<i>`` (as ``cell_plan``'s)."""
    prefix = f"{name}/"
    runs = {k[len(prefix) :]: v for k, v in state.get("runs", {}).items() if k.startswith(prefix)}
    return {**state, "runs": runs}


# --------------------------------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------------------------------


def combine_seeds(per_seed: list[dict]) -> dict | None:
    """One difference from per-seed paired differences ({delta, se, problems}): their mean, se = sqrt(sum se^2) / S
    (independent problem sets), a normal 95% interval. None without any."""
    if not per_seed:
        return None
    s = len(per_seed)
    delta = sum(d["delta"] for d in per_seed) / s
    se = math.sqrt(sum(d["se"] ** 2 for d in per_seed)) / s
    return {
        "delta": delta,
        "se": se,
        "ci_low": delta - _Z * se,
        "ci_high": delta + _Z * se,
        "seeds": s,
        "problems": [d["problems"] for d in per_seed],
    }


def compare(evals: dict[str, dict[int, tuple[str, dict]]], bases: dict[str, dict], a: str, b: str) -> dict | None:
    """pass@1 of arm ``a`` minus arm ``b`` (or ``"base"``: the base model) after training, paired by problem within
    each seed index both finished with the same evaluation setting, combined over seeds (``combine_seeds``).

    ``evals``: arm -> seed index -> (eval_key, the run's after-evaluation); ``bases``: eval_key -> base evaluation.
    None when no seed index has both sides."""
    per_seed = []
    for i, (key_a, ev_a) in sorted(evals.get(a, {}).items()):
        if b == "base":
            other = bases.get(key_a)
        else:
            key_b, other = evals.get(b, {}).get(i, (None, None))
            if key_b != key_a:  # evaluated on other problems or with other sampling seeds: not paired
                other = None
        if other is None:
            continue
        d = pass_at_k_deltas(other, ev_a)[1]
        per_seed.append({"seed_index": i, **d})
    out = combine_seeds(per_seed)
    if out is not None:
        out["per_seed"] = per_seed
    return out


# --------------------------------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------------------------------


def _entropy(run_dir: str) -> dict | None:
    """Mean token entropy of the policy on its rollouts (``mean_entropy`` of metrics.jsonl) at the first and last
    step that updated, None when no step logged one."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        steps = [r for r in (json.loads(line) for line in f if line.strip()) if "reward_mean" in r]
    values = [(r["step"], r["mean_entropy"]) for r in steps if isinstance(r.get("mean_entropy"), (int, float))]
    if not values:
        return None
    return {"first_step": values[0][0], "first": values[0][1], "last_step": values[-1][0], "last": values[-1][1]}


def _contamination(task: str, clean: bool) -> str:
    from rlvr_fast.tasks.reasoning_gym import is_reasoning_gym_task

    if clean:
        return "the built-in arithmetic task: contamination-free by construction (seeded generator, fresh expressions)"
    if is_reasoning_gym_task(task):
        return (
            "a reasoning-gym generator: problems drawn fresh from a seeded generator (its code is public; these items "
            "are not checked against pretraining data)"
        )
    return "a data file: its contamination is not checked here"


def _cell_summary(plan: StudyPlan, name: str, findings: dict) -> dict:
    cell = plan.cells[name]
    sub = plan.cell_plan(name)
    state_runs = {r["run"]: r for r in findings["runs"]}
    bases: dict[str, dict] = {}
    evals: dict[str, dict[int, tuple[str, dict]]] = {}
    runs: dict[str, dict] = {}
    for spec in sub.runs:
        path = base_eval_path(sub.output_dir, spec.eval_key)
        if spec.eval_key not in bases and os.path.exists(path):
            bases[spec.eval_key] = eval_dict_from_json(_read_json(path))
        status = state_runs[spec.key]["status"]
        entry: dict = {"arm": spec.arm, "seed": spec.config["seed"], "status": status, "run_dir": spec.run_dir}
        if status == "done":
            after = eval_dict_from_json(_read_json(os.path.join(spec.run_dir, "eval_after.json")))
            evals.setdefault(spec.arm, {})[spec.seed_index] = (spec.eval_key, after)
            curve = pass_at_k_curve_ci(after)
            fmt = findings["findings"]["formats"]["runs"].get(spec.key, {})
            dominant = fmt.get("dominant_eval_after")
            entry.update(
                pass_at_1=curve[1],
                pass_at_n=curve[max(curve)],
                n=after["n"],
                delta_vs_base=findings["findings"]["pass_at_k"]["runs"][spec.key]["delta"].get(1),
                format_after=({"class": dominant, **fmt["eval_after"][dominant]} if dominant is not None else None),
                entropy=_entropy(spec.run_dir),
            )
        else:
            entry["why"] = (state_runs[spec.key].get("error") or {}).get("message") or state_runs[spec.key].get(
                "reason"
            )
        runs[spec.key] = entry
    primary = sub.run(sub.primary)
    base_eval = bases.get(primary.eval_key)
    base_fmt = findings["findings"]["formats"]["base"].get("base", {})
    base_dominant = max(base_fmt, key=lambda c: base_fmt[c]["frequency"]) if base_fmt else None
    mk, tk, prediction = predict(cell.model, cell.task)
    comparisons = {}
    for comp in COMPARISONS:
        a, b = (s.strip() for s in comp.split(" - "))
        measured = compare(evals, bases, a, b)
        sign = prediction.signs.get(comp, "?") if prediction is not None else "?"
        verdict = agreement(sign, measured["ci_low"], measured["ci_high"]) if measured is not None else "not measured"
        comparisons[comp] = {"measured": measured, "predicted": sign, "data": verdict}
    clean = bool(findings["findings"]["reward"]["task"]["clean"])
    return {
        "cell": name,
        "model": cell.model,
        "task": cell.task,
        "task_params": cell.task_params,
        "model_kind": mk,
        "task_kind": tk,
        "prediction": (
            {"text": prediction.text, "source": prediction.source, "signs": dict(prediction.signs)}
            if prediction is not None
            else None
        ),
        "comparisons": comparisons,
        "base": {
            "eval_key": primary.eval_key,
            "pass_at_1": pass_at_k_curve_ci(base_eval)[1] if base_eval is not None else None,
            "pass_at_n": pass_at_k_curve_ci(base_eval)[base_eval["n"]] if base_eval is not None else None,
            "n": base_eval["n"] if base_eval is not None else None,
            "problems": len(base_eval["correct_counts"]) if base_eval is not None else None,
            "format": {"class": base_dominant, **base_fmt[base_dominant]} if base_dominant else None,
        },
        "runs": runs,
        "clean": clean,
        "contamination": _contamination(cell.task, clean),
        "config": {
            k: primary.config[k]
            for k in ("steps", "prompts_per_step", "group_size", "max_completion_length", "eval_size", "eval_samples")
        },
        "report": os.path.relpath(os.path.join(cell.dir, REPORT_FILE), plan.output_dir),
    }


def analyse_cells(plan: StudyPlan, state: dict) -> tuple[dict, dict]:
    """(the cross-cell findings {"lead_table", "cells"}, per cell its single-cell ``analyse`` result)."""
    per_cell = {name: analyse(plan.cell_plan(name), cell_state(plan, state, name)) for name in plan.cells}
    cells = {name: _cell_summary(plan, name, per_cell[name]) for name in plan.cells}
    lead = [
        {
            "cell": name,
            "model": c["model"],
            "task": c["task"],
            "task_params": c["task_params"],
            **{comp: c["comparisons"][comp] for comp in LEAD_COMPARISONS},
        }
        for name, c in cells.items()
    ]
    return {"lead_table": lead, "cells": cells}, per_cell


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------

_SIGN_TEXT = {"+": "above 0", "-": "below 0", "0": "about 0 (within +-0.05)", "?": "no sign predicted"}


def _task_label(c: dict) -> str:
    params = ", ".join(f"{k}: {v}" for k, v in c["task_params"].items())
    return f"`{c['task']}`" + (f" ({params})" if params else "")


def _lead_section(fnd: dict) -> list[str]:
    lines = [
        "## Which rewards help which model: pass@1 after training, correct minus each other reward",
        "",
        "Paired by problem (the two arms answer the same held-out problems with the same sampling seeds), 95% "
        "intervals; the last columns say whether each difference agrees with the research context's prediction "
        "(below, per cell).",
        "",
        "| model | task | correct - random | correct - inverse | prediction | data (random, inverse) |",
        "|---|---|---|---|---|---|",
    ]
    for row, c in ((r, fnd["cells"][r["cell"]]) for r in fnd["lead_table"]):
        pred = ", ".join(c["comparisons"][comp]["predicted"] for comp in LEAD_COMPARISONS)
        data = ", ".join(c["comparisons"][comp]["data"] for comp in LEAD_COMPARISONS)
        lines.append(
            f"| `{row['model']}` | {_task_label(row)} | {_dci(row['correct - random']['measured'])} | "
            f"{_dci(row['correct - inverse']['measured'])} | {pred} | {data} |"
        )
    return lines


def _measured_sentence(comp: str, e: dict) -> str:
    m = e["measured"]
    if m is None:
        return f"- {comp}: not measured (an arm of it has no finished run with a matching evaluation)."
    seeds = f"{m['seeds']} seed{'s' if m['seeds'] > 1 else ''}, {'+'.join(str(p) for p in m['problems'])} problems"
    text = f"- {comp}: {_dci(m)} ({seeds})"
    if e["predicted"] == "?":
        return text + "; no sign predicted for this cell."
    text += f"; predicted {_SIGN_TEXT[e['predicted']]}: the data **{e['data']}**"
    if e["data"] == "inconclusive" and math.isnan(m["ci_low"]):
        text += " (no interval: too few held-out problems to estimate one)"
    elif e["data"] == "inconclusive":
        text += " (the interval includes 0" + (" or reaches past +-0.05" if e["predicted"] == "0" else "") + ")"
    return text + "."


def _run_sentence(key: str, r: dict) -> str:
    if r["status"] != "done":
        why = f": {r['why']}" if r.get("why") else ""
        return f"- `{key}`: {r['status']}{why}."
    text = (
        f"- `{key}`: pass@1 {_ci(r['pass_at_1'])} (vs base {_dci(r['delta_vs_base'])}), pass@{r['n']} "
        f"{_ci(r['pass_at_n'])}"
    )
    if r["format_after"]:
        f = r["format_after"]
        text += f"; most frequent format after training `{f['class']}` ({_ci(f, 'frequency')})"
    e = r["entropy"]
    if e and e["first_step"] == e["last_step"]:
        text += f"; rollout entropy {_f(e['first'])} nats per token at step {e['first_step'] + 1}, the only step that "
        text += "updated"
    elif e:
        text += f"; rollout entropy {_f(e['first'])} at step {e['first_step'] + 1} -> {_f(e['last'])} at step "
        text += f"{e['last_step'] + 1} (nats per token, the first and last steps that updated)"
    elif r["status"] == "done":
        text += "; no step updated (every group's rewards were equal), so no rollout entropy was logged"
    return text + "."


def _cell_section(c: dict) -> list[str]:
    kinds = (
        f"{MODEL_KIND_TEXT.get(c['model_kind'], 'a model of unknown kind')} on "
        f"{TASK_KIND_TEXT.get(c['task_kind'], c['task_kind'])}"
    )
    lines = [
        f"### `{c['cell']}`: `{c['model']}` on {_task_label(c)}",
        "",
        f"Model kind `{c['model_kind']}`, task kind `{c['task_kind']}`: {kinds}.",
        "",
    ]
    p = c["prediction"]
    if p is None:
        lines.append(
            f"**Prediction** (research context, not measured): none for ({c['model_kind']}, {c['task_kind']})."
        )
    else:
        lines.append(f"**Prediction** (research context, not measured; {p['source']}): {p['text']}.")
    lines += ["", "| comparison | predicted | measured (paired, 95% CI) | data |", "|---|---|---|---|"]
    for comp, e in c["comparisons"].items():
        lines.append(f"| {comp} | {e['predicted']} | {_dci(e['measured'])} | {e['data']} |")
    lines.append("")
    lines += [_measured_sentence(comp, e) for comp, e in c["comparisons"].items()]
    b = c["base"]
    lines += ["", "**Measured in this cell:**", ""]
    if b["pass_at_1"] is not None:
        text = (
            f"- base model: pass@1 {_ci(b['pass_at_1'])}, pass@{b['n']} {_ci(b['pass_at_n'])} on {b['problems']} "
            f"held-out problems x n={b['n']}"
        )
        if b["format"]:
            text += f"; most frequent format `{b['format']['class']}` ({_ci(b['format'], 'frequency')})"
        lines.append(text + ".")
    else:
        lines.append("- base model: not evaluated yet.")
    lines += [_run_sentence(k, r) for k, r in c["runs"].items()]
    cfg = c["config"]
    lines += [
        f"- Task: {c['contamination']}.",
        f"- {cfg['steps']} steps of {cfg['prompts_per_step']} prompts x {cfg['group_size']} completions (at most "
        f"{cfg['max_completion_length']} new tokens); held-out {cfg['eval_size']} problems x n={cfg['eval_samples']}. "
        f"Every finding of this cell (pass@k curves, formats, update sparsity, ...): [{c['report']}]({c['report']}).",
    ]
    return lines


def _header(plan: StudyPlan, state: dict, meta: dict) -> list[str]:
    statuses = [e.get("status", "pending") for e in (state["runs"].get(r.key, {}) for r in plan.runs)]
    done, failed, skipped = statuses.count("done"), statuses.count("failed"), statuses.count("skipped")
    return [
        "# rlvr_fast study across models: which rewards help which model?",
        "",
        *provenance_lines(meta),
        f"- Preset `{plan.preset}`: {len(plan.cells)} cells x arms {', '.join(f'`{a}`' for a in plan.arms)}; runs: "
        f"{done} done, {failed} failed, {skipped} skipped, {len(statuses) - done - failed - skipped} not finished, "
        f"of {len(statuses)}. Every arm of a cell starts from the cell's base model; each cell has its own base "
        f"evaluation and report (`cells/<cell>/`).",
        "- Intervals are 95%, normal over problems; a difference is paired by problem within a seed and averaged over "
        "seeds. A prediction comes from the research context (a table in `rlvr_fast/study/predictions.py`), not "
        "from these runs: agree = the interval lies on the predicted side of 0 (inside +-0.05 for a predicted 0), "
        "disagree = on the other side, inconclusive = it includes 0.",
        "",
    ]


def write_cells_report(plan: StudyPlan, state: dict, meta: dict | None = None) -> tuple[str, str]:
    """Each cell's single-cell report into its folder, then ``report.md`` and ``study.json`` of the study (leading
    with the lead table); returns (report path, study.json path)."""
    fnd, per_cell = analyse_cells(plan, state)
    for name, analysis in per_cell.items():
        write_study_report(plan.cell_plan(name), cell_state(plan, state, name), analysis, meta)
    meta = report_meta(state, meta)

    lines = _header(plan, state, meta) + _lead_section(fnd) + ["", "## Prediction and data, per cell", ""]
    for c in fnd["cells"].values():
        lines += _cell_section(c) + [""]
    lines.append(f"Every number above is in [`{STUDY_JSON}`]({STUDY_JSON}).")
    out = plan.output_dir
    report = os.path.join(out, REPORT_FILE)
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, report)
    study = {
        "format": FORMAT,
        "lead_table": fnd["lead_table"],
        "cells": fnd["cells"],
        "meta": meta,
        "plan": {
            "preset": plan.preset,
            "output_dir": plan.output_dir,
            "base_overrides": plan.base_overrides,
            "arms": {n: {"group": a.group, "doc": a.doc, "overrides": dict(a.overrides)} for n, a in plan.arms.items()},
            "cells": {
                n: {"model": c.model, "task": c.task, "task_params": c.task_params, "overrides": c.overrides}
                for n, c in plan.cells.items()
            },
            "runs": [
                {"key": r.key, "cell": r.cell, "arm": r.arm, "seed": r.config["seed"], "run_dir": r.run_dir}
                for r in plan.runs
            ],
        },
        "state": state["runs"],
    }
    path = os.path.join(out, STUDY_JSON)
    write_json_atomic(path, _sanitize(study))
    return report, path
