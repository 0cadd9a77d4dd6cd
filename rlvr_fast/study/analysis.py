"""Every finding of the study, computed from the runs' own outputs (nothing here trains or samples).

Inputs per finished run (a normal trainer run folder): ``eval_after.json`` (held-out pass@k counts, formats,
per-completion confidences), ``metrics.jsonl`` (per-step rewards, filter counts, format frequencies of the rollouts),
``update_sparsity.json`` and the changed-set mask files (``updates.record_update``); per evaluation setting the shared
base-model evaluation ``<study>/base/<eval_key>/eval.json``.

Findings (the keys of ``analyse(...)["findings"]``), each with the numbers and their 95% intervals (``stats``):

1. ``pass_at_k``: pass@k for k = 1..n of the base and every run; the paired difference to the base per k and where
   its sign changes (where the curves cross; Yue et al. 2025, arXiv:2504.13837).
2. ``reward``: per reward arm, pass@1 minus the base's, paired over problems; improved / worsened / no detectable
   change by whether the interval excludes 0 (Shao et al. 2025; Wu et al. 2025 on clean tasks).
3. ``sample``: pass@n at the largest k for all (GRPO), psr, nsr and the other sample arms, and their paired
   differences (Zhu et al. 2025, arXiv:2506.01347).
4. ``calibration``: ECE, Brier and AUROC (bootstrap intervals) of the brier arm vs the reference arm at their pass@1
   (RLCR, Damani et al. 2025, arXiv:2507.16806), for the stated confidence and, elicitation-free, for the agreement
   of the n samples (``stats.agreement_confidence``), which every model has.
5. ``update_sparsity``: fraction of entries unchanged (float32 and bf16), by tensor kind, the changed sets' Jaccard
   overlaps between arms and between seeds against chance, and a sparse-reuse arm's containment in its mask
   (Mukherjee et al. 2025, arXiv:2505.11711).
6. ``formats``: format-class frequency per training step and before/after on the held-out set, with each class's
   accuracy (Zhao et al. 2025, arXiv:2504.07912; Shao et al. 2025).
7. ``difficulty``: groups each filter removed, and the filtered arms' pass@1 vs the unfiltered baseline.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rlvr_fast.eval import reliability_bins
from rlvr_fast.study.arms import BASELINE_ARM, CONFIDENCE_PROMPT
from rlvr_fast.study.plan import EVAL_DATA_FIELDS, RunSpec, StudyPlan, base_eval_path
from rlvr_fast.study.stats import (
    agreement_confidence,
    bootstrap_calibration,
    intervals_overlap,
    pass_at_k_curve_ci,
    pass_at_k_deltas,
    wilson,
)
from rlvr_fast.study.update_modes import update_modes
from rlvr_fast.study.updates import MASK_FILES, UPDATE_FILE, changed_set_overlaps, containment
from rlvr_fast.trainer.evaluation.held_out import eval_dict_from_json

__all__ = ["analyse", "verdict"]

LABEL_FIELDS = (
    "seed",
    "prompt_template",
    "max_completion_length",
    "eval_samples",
    "eval_size",
    "eval_temperature",
    "top_p",
    "system_prompt",
    "format_classes",
    "eval_calibration",
    *EVAL_DATA_FIELDS,
)
SAMPLE_ARMS = ("psr", "nsr", "w_reinforce", "positive_only", "negative_only")


def verdict(ci_low: float, ci_high: float) -> str:
    """'improved' when the interval of a difference lies above 0, 'worsened' below, 'no interval' when there is none
    (one held-out problem: NaN bounds), else 'no detectable change'."""
    if math.isnan(ci_low) or math.isnan(ci_high):
        return "no interval"
    if ci_low > 0:
        return "improved"
    if ci_high < 0:
        return "worsened"
    return "no detectable change"


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class _Run:
    """A run's spec, status and (when done) its outputs."""

    def __init__(self, spec: RunSpec, entry: dict, arm_group: str):
        self.spec, self.entry, self.group = spec, entry, arm_group
        self.key, self.arm, self.seed = spec.key, spec.arm, spec.config["seed"]
        self.status = entry.get("status", "pending")
        self.after = self.metrics = self.update = None
        if self.status == "done":
            self.after = eval_dict_from_json(_read_json(os.path.join(spec.run_dir, "eval_after.json")))
            with open(os.path.join(spec.run_dir, "metrics.jsonl")) as f:
                self.metrics = [json.loads(line) for line in f if line.strip()]
            self.update = _read_json(os.path.join(spec.run_dir, UPDATE_FILE))

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def steps(self) -> list[dict]:
        return [m for m in self.metrics if "reward_mean" in m]

    def why_missing(self) -> str:
        if self.status == "failed":
            err = self.entry.get("error") or {}
            return f"failed: {err.get('type')}: {err.get('message')}"
        if self.status == "skipped":
            return f"skipped: {self.entry.get('reason')}"
        return self.status


def _short(value: Any) -> str:
    text = repr(value)
    if value == CONFIDENCE_PROMPT:
        return "the confidence prompt"
    return text if len(text) <= 32 else text[:29] + "...'"


def _base_labels(plan: StudyPlan) -> dict[str, dict]:
    """eval_key -> {"label", "differs", "runs"}: "base" for the primary run's setting, else what differs from it."""
    primary = plan.run(plan.primary)
    out: dict[str, dict] = {}
    for spec in plan.runs:
        entry = out.setdefault(spec.eval_key, {"runs": [], "differs": {}})
        entry["runs"].append(spec.key)
        if spec.eval_key == primary.eval_key:
            entry["label"] = "base"
            continue
        diff = {f: spec.config[f] for f in LABEL_FIELDS if spec.config[f] != primary.config[f]}
        entry["differs"] = diff
        entry["label"] = "base (" + ", ".join(f"{k}={_short(v)}" for k, v in diff.items()) + ")"
    return out


def _ci_tuple(d: dict) -> tuple[float, float]:
    return d["ci_low"], d["ci_high"]


def _sign(x: float, tol: float = 1e-12) -> int:
    return 0 if abs(x) <= tol else (1 if x > 0 else -1)


def _crossings(delta: dict[int, dict]) -> list[list[int]]:
    """[k_a, k_b] pairs where the sign of the difference changes between k_a and the next k with a nonzero one."""
    out, last_k, last_s = [], None, 0
    for k in sorted(delta):
        s = _sign(delta[k]["delta"])
        if s == 0:
            continue
        if last_s and s != last_s:
            out.append([last_k, k])
        last_k, last_s = k, s
    return out


# --------------------------------------------------------------------------------------------------------------------
# The findings
# --------------------------------------------------------------------------------------------------------------------


def _pass_at_k(runs: list[_Run], bases: dict, labels: dict) -> dict:
    out: dict = {"base": {}, "runs": {}}
    for key, ev in bases.items():
        out["base"][labels[key]["label"]] = {
            "eval_key": key,
            "curve": pass_at_k_curve_ci(ev),
            "problems": len(ev["correct_counts"]),
            "n": ev["n"],
        }
    for r in runs:
        if not r.done:
            continue
        base = bases.get(r.spec.eval_key)
        delta = pass_at_k_deltas(base, r.after) if base is not None else {}
        out["runs"][r.key] = {
            "arm": r.arm,
            "seed": r.seed,
            "base": labels[r.spec.eval_key]["label"],
            "curve": pass_at_k_curve_ci(r.after),
            "delta": delta,
            "above": [k for k, d in delta.items() if _sign(d["delta"]) > 0],
            "below": [k for k, d in delta.items() if _sign(d["delta"]) < 0],
            "significantly_above": [k for k, d in delta.items() if d["ci_low"] > 0],
            "significantly_below": [k for k, d in delta.items() if d["ci_high"] < 0],
            "crossings": _crossings(delta),
        }
    return out


def _reward(runs: list[_Run], passk: dict, plan: StudyPlan) -> dict:
    primary = plan.run(plan.primary).config
    rows = []
    for r in runs:
        if r.group != "reward" or not r.done:
            continue
        entry = passk["runs"][r.key]
        d = entry["delta"][1]
        rows.append(
            {
                "run": r.key,
                "arm": r.arm,
                "seed": r.seed,
                "rewards": r.spec.config["rewards"],
                "base": entry["base"],
                "base_pass_at_1": passk["base"][entry["base"]]["curve"][1],
                "pass_at_1": entry["curve"][1],
                "delta": d,
                "verdict": verdict(d["ci_low"], d["ci_high"]),
            }
        )
    return {
        "task": {
            "task": primary["task"],
            "task_preset": primary["task_preset"],
            "clean": primary["task"] == "arithmetic",
        },
        "rows": rows,
        "improved": sorted({row["arm"] for row in rows if row["verdict"] == "improved"}),
        "not_improved": sorted({row["arm"] for row in rows if row["verdict"] != "improved"}),
        "missing": {r.key: r.why_missing() for r in runs if r.group == "reward" and not r.done},
    }


def _sample(runs: list[_Run], passk: dict) -> dict:
    members = [r for r in runs if r.arm == BASELINE_ARM or r.arm in SAMPLE_ARMS or r.group == "sample"]
    done = [r for r in members if r.done]
    rows, pairs = [], []
    for r in done:
        entry = passk["runs"][r.key]
        k = max(entry["curve"])
        rows.append(
            {
                "run": r.key,
                "arm": r.arm,
                "seed": r.seed,
                "label": "all (grpo)" if r.arm == BASELINE_ARM else r.arm,
                "k": k,
                "pass_at_k": entry["curve"][k],
                "delta_vs_base": entry["delta"].get(k),
                "base": entry["base"],
            }
        )
    by_seed: dict[int, list[_Run]] = {}
    for r in done:
        by_seed.setdefault(r.spec.seed_index, []).append(r)
    for group in by_seed.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a.spec.eval_key != b.spec.eval_key:
                    continue
                k = min(a.after["n"], b.after["n"])
                d = pass_at_k_deltas(b.after, a.after)[k]  # a - b, paired over the same problems
                ca, cb = passk["runs"][a.key]["curve"][k], passk["runs"][b.key]["curve"][k]
                pairs.append(
                    {
                        "a": a.key,
                        "b": b.key,
                        "k": k,
                        "delta": d,
                        "intervals_overlap": intervals_overlap(_ci_tuple(ca), _ci_tuple(cb)),
                    }
                )
    return {"rows": rows, "pairs": pairs, "missing": {r.key: r.why_missing() for r in members if not r.done}}


def _agreement(ev: dict) -> dict | None:
    pc = ev.get("per_completion")
    if pc is None or "answer" not in pc:
        return None
    return {"confidence": agreement_confidence(pc, ev["n"]), "correct": pc["correct"]}


def _reliability(pc: dict) -> dict | None:
    q = [c for c in pc["confidence"] if c is not None]
    c = [v for v, conf in zip(pc["correct"], pc["confidence"]) if conf is not None]
    if not q:
        return None
    bins = reliability_bins(q, c)
    return {
        k: [None if x != x else float(x) for x in getattr(bins, k)]
        for k in ("upper_edges", "count", "mean_confidence", "accuracy")
    }


def _calibration(runs: list[_Run], bases: dict, labels: dict) -> dict:
    """Per brier run: its reference (correct_conf, else correct, same seed index), the base under its setting; for
    each, pass@1 and calibration of the stated confidence ("stated") and of the samples' agreement ("agreement"),
    with bootstrap intervals, and the paired differences brier - reference. "all_agreement": the agreement
    calibration of every finished run and base."""
    done = {r.key: r for r in runs if r.done}
    brier_runs = [r for r in runs if r.arm == "brier" or "brier" in r.spec.config["rewards"]]
    out: dict = {
        "pairs": [],
        "missing": {r.key: r.why_missing() for r in brier_runs if not r.done},
        "all_agreement": {},
    }
    if not brier_runs:
        out["note"] = "no arm of this study uses the brier reward"
    for r in brier_runs:
        if not r.done:
            continue
        ref = None
        for arm in ("correct_conf", BASELINE_ARM):
            cand = done.get(f"{arm}/seed{r.spec.seed_index}")
            if cand is not None:
                ref = cand
                break
        entry: dict = {
            "brier": r.key,
            "reference": ref.key if ref else None,
            "paired": bool(ref and ref.spec.eval_key == r.spec.eval_key),
            "base": labels[r.spec.eval_key]["label"],
            "pass_at_1": {},
            "stated": {},
            "agreement": {},
            "reliability": {"stated": {}, "agreement": {}},
            "difference": {},
        }
        if ref is None:
            entry["note"] = (
                f"no finished reference run (correct_conf or {BASELINE_ARM}) with seed index {r.spec.seed_index}"
            )
        evaluated = {r.key: r.after, entry["base"]: bases.get(r.spec.eval_key)}
        if ref is not None:
            evaluated[ref.key] = ref.after
        for name, ev in evaluated.items():
            if ev is None:
                continue
            entry["pass_at_1"][name] = pass_at_k_curve_ci(ev)[1]
            for kind, pc in (("stated", ev.get("per_completion")), ("agreement", _agreement(ev))):
                entry[kind][name] = bootstrap_calibration(pc, ev["n"]) if pc is not None else None
                rel = _reliability(pc) if pc is not None else None
                if rel is not None:
                    entry["reliability"][kind][name] = rel
        if entry["paired"]:  # brier - reference on the same problems
            for kind, get in (("stated", lambda ev: ev.get("per_completion")), ("agreement", _agreement)):
                a, b = get(r.after), get(ref.after)
                if a is not None and b is not None:
                    entry["difference"][kind] = bootstrap_calibration(a, r.after["n"], b)["difference"]
        out["pairs"].append(entry)
    for key, ev in bases.items():
        pc = _agreement(ev)
        if pc is not None:
            out["all_agreement"][labels[key]["label"]] = {
                "pass_at_1": pass_at_k_curve_ci(ev)[1],
                **bootstrap_calibration(pc, ev["n"]),
            }
    for r in done.values():
        pc = _agreement(r.after)
        if pc is not None:
            out["all_agreement"][r.key] = {
                "pass_at_1": pass_at_k_curve_ci(r.after)[1],
                **bootstrap_calibration(pc, r.after["n"]),
            }
    return out


def _by_kind(update: dict) -> dict:
    kinds: dict[str, dict] = {}
    for t in update["tensors"].values():
        k = kinds.setdefault(t["kind"], {"numel": 0, "unchanged_entries": {d: 0.0 for d in t["unchanged"]}})
        k["numel"] += t["numel"]
        for d, frac in t["unchanged"].items():
            k["unchanged_entries"][d] += frac * t["numel"]
    return {
        name: {"numel": k["numel"], **{d: v / k["numel"] for d, v in k["unchanged_entries"].items()}}
        for name, k in kinds.items()
    }


def _sparsity(runs: list[_Run], passk: dict) -> dict:
    done = [r for r in runs if r.done]
    out: dict = {
        "atol": None,
        "runs": {},
        "overlap": {},
        "seed_pairs": {},
        "arm_pairs": {},
        "sparse_reuse": [],
        "missing": {r.key: r.why_missing() for r in runs if not r.done},
    }
    for r in done:
        out["atol"] = r.update["atol"]
        f32, bf = r.update["overall"]["float32"], r.update["overall"]["bfloat16"]
        out["runs"][r.key] = {
            "arm": r.arm,
            "seed": r.seed,
            "unchanged": r.update["overall"],
            "changed": {d: 1 - v for d, v in r.update["overall"].items()},
            # float32 changes that rounding to bf16 hides (bf16-unchanged is a superset)
            "hidden_by_bf16": (bf - f32) / (1 - f32) if f32 < 1 else float("nan"),
            "by_kind": _by_kind(r.update),
        }
    for dtype, fname in MASK_FILES.items():
        paths = {
            r.key: os.path.join(r.spec.run_dir, fname)
            for r in done
            if os.path.exists(os.path.join(r.spec.run_dir, fname))
        }
        ov = changed_set_overlaps(paths)
        out["overlap"][dtype] = ov
        arm_of = {r.key: r.arm for r in done}
        seed_pairs = {p: v for p, v in ov["pairs"].items() if arm_of[p.split("|")[0]] == arm_of[p.split("|")[1]]}
        arm_pairs = {p: v for p, v in ov["pairs"].items() if p not in seed_pairs}
        for target, pairs in ((out["seed_pairs"], seed_pairs), (out["arm_pairs"], arm_pairs)):
            js = [v["jaccard"] for v in pairs.values() if v["jaccard"] == v["jaccard"]]
            cs = [v["chance_jaccard"] for v in pairs.values() if v["chance_jaccard"] == v["chance_jaccard"]]
            target[dtype] = {
                "pairs": len(pairs),
                "mean_jaccard": sum(js) / len(js) if js else None,
                "min_jaccard": min(js) if js else None,
                "max_jaccard": max(js) if js else None,
                "mean_chance_jaccard": sum(cs) / len(cs) if cs else None,
            }
    by_key = {r.key: r for r in runs}
    for r in done:
        if r.spec.depends_on is None:
            continue
        dep = by_key[r.spec.depends_on]
        mask = r.spec.config["mask_source"]
        entry = {
            "run": r.key,
            "mask_from": dep.key,
            "mask_file": mask,
            "mask_density": 1 - dep.update["overall"]["bfloat16"] if dep.done else None,
            "containment_fp32_in_mask": containment(os.path.join(r.spec.run_dir, MASK_FILES["float32"]), mask),
        }
        if dep.done and dep.spec.eval_key == r.spec.eval_key:
            d = pass_at_k_deltas(dep.after, r.after)[1]
            entry.update(
                pass_at_1=passk["runs"][r.key]["curve"][1],
                dense_pass_at_1=passk["runs"][dep.key]["curve"][1],
                delta_vs_dense=d,
                verdict_vs_dense=verdict(d["ci_low"], d["ci_high"]),
            )
        out["sparse_reuse"].append(entry)
    return out


def _freq(stats: dict, total: int) -> dict:
    lo, hi = wilson(stats["count"], total)
    return {
        "frequency": stats["frequency"],
        "count": stats["count"],
        "total": total,
        "ci_low": lo,
        "ci_high": hi,
        "accuracy": stats.get("accuracy"),
    }


def _formats(runs: list[_Run], bases: dict, labels: dict, classes: dict) -> dict:
    out: dict = {
        "classes": classes,
        "runs": {},
        "base": {},
        "missing": {r.key: r.why_missing() for r in runs if not r.done},
    }
    if not classes:
        out["note"] = "no format classes were configured (format_classes is empty)"
        return out
    for key, ev in bases.items():
        total = len(ev["correct_counts"]) * ev["n"]
        out["base"][labels[key]["label"]] = {c: _freq(s, total) for c, s in (ev.get("formats") or {}).items()}
    for r in runs:
        if not r.done:
            continue
        steps = [m for m in r.steps if "formats" in m]
        per_class: dict[str, list[float]] = {}
        for m in steps:
            for c, s in m["formats"].items():
                per_class.setdefault(c, []).append(s["frequency"])
        total_step = r.spec.config["prompts_per_step"] * r.spec.config["group_size"]
        ev_total = len(r.after["correct_counts"]) * r.after["n"]
        entry = {
            "steps": [m["step"] for m in steps],
            "train": per_class,
            "first_step": {c: _freq(s, total_step) for c, s in steps[0]["formats"].items()} if steps else {},
            "last_step": {c: _freq(s, total_step) for c, s in steps[-1]["formats"].items()} if steps else {},
            "eval_after": {c: _freq(s, ev_total) for c, s in (r.after.get("formats") or {}).items()},
            "base": labels[r.spec.eval_key]["label"],
        }
        for when in ("first_step", "last_step", "eval_after"):
            if entry[when]:
                entry[f"dominant_{when}"] = max(entry[when], key=lambda c: entry[when][c]["frequency"])
        out["runs"][r.key] = entry
    return out


def _difficulty(runs: list[_Run], passk: dict) -> dict:
    members = [
        r
        for r in runs
        if r.arm == BASELINE_ARM
        or r.group == "difficulty"
        or r.spec.config["filter_all_equal"]
        or r.spec.config["min_solve_rate"] is not None
        or r.spec.config["max_solve_rate"] is not None
    ]
    done = {r.key: r for r in members if r.done}
    rows = []
    for r in done.values():
        cfg = r.spec.config
        removed: dict[str, int] = {}
        for m in r.steps:
            for rule, n in (m.get("groups_filtered") or {}).items():
                removed[rule] = removed.get(rule, 0) + int(n)
        seen = len(r.steps) * cfg["prompts_per_step"]
        row = {
            "run": r.key,
            "arm": r.arm,
            "seed": r.seed,
            "rules": {k: cfg[k] for k in ("filter_all_equal", "min_solve_rate", "max_solve_rate")},
            "groups_seen": seen,
            "removed": removed,
            "removed_total": sum(removed.values()),
            "all_equal_groups": sum(int(m.get("all_equal_groups", 0)) for m in r.steps),
            "completions_updated": sum(int(m.get("completions_updated", 0)) for m in r.steps),
            "mean_solve_rate": sum(m["solve_rate"] for m in r.steps) / len(r.steps) if r.steps else None,
            "pass_at_1": passk["runs"][r.key]["curve"][1],
        }
        base_run = done.get(f"{BASELINE_ARM}/seed{r.spec.seed_index}")
        if r.arm != BASELINE_ARM and base_run is not None and base_run.spec.eval_key == r.spec.eval_key:
            d = pass_at_k_deltas(base_run.after, r.after)[1]
            row.update(
                baseline=base_run.key, delta_vs_baseline=d, verdict_vs_baseline=verdict(d["ci_low"], d["ci_high"])
            )
        rows.append(row)
    return {"rows": rows, "missing": {r.key: r.why_missing() for r in members if not r.done}}


def analyse(plan: StudyPlan, state: dict) -> dict:
    """All findings of the study as a JSON-able dict (NaN where a number is undefined)."""
    runs = [_Run(s, state["runs"].get(s.key, {"status": "pending"}), plan.arms[s.arm].group) for s in plan.runs]
    labels = _base_labels(plan)
    bases = {}
    for key in labels:
        path = base_eval_path(plan.output_dir, key)
        if os.path.exists(path):
            bases[key] = eval_dict_from_json(_read_json(path))
    passk = _pass_at_k(runs, bases, labels)
    classes = plan.run(plan.primary).config["format_classes"]
    return {
        "base_settings": {
            labels[k]["label"]: {
                "eval_key": k,
                "differs_from_primary": labels[k]["differs"],
                "runs": labels[k]["runs"],
                "evaluated": k in bases,
            }
            for k in labels
        },
        "runs": [
            {
                "run": r.key,
                "arm": r.arm,
                "group": r.group,
                "seed": r.seed,
                "status": r.status,
                "seconds": r.entry.get("seconds"),
                "attempts": r.entry.get("attempts"),
                "error": r.entry.get("error"),
                "reason": r.entry.get("reason"),
                "pass_at_1": passk["runs"][r.key]["curve"][1] if r.done else None,
                "delta_pass_at_1": passk["runs"][r.key]["delta"].get(1) if r.done else None,
                "base": labels[r.spec.eval_key]["label"],
                "run_dir": r.spec.run_dir,
            }
            for r in runs
        ],
        "findings": {
            "pass_at_k": passk,
            "reward": _reward(runs, passk, plan),
            "sample": _sample(runs, passk),
            "calibration": _calibration(runs, bases, labels),
            "update_sparsity": _sparsity(runs, passk),
            "formats": _formats(runs, bases, labels, classes),
            "difficulty": _difficulty(runs, passk),
        },
        # per run: trainable parameters, optimizer bytes, memory, step time, update ranks (study/update_modes.py)
        "update_modes": update_modes(runs),
    }
