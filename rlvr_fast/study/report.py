"""The study report: ``report.md`` (every sentence built from the measured numbers in ``analyse``), PNG figures
(matplotlib, Agg) and ``study.json`` (every number of the report, the plan, and the state of every run).

Intervals are 95%: normal over problems for pass@k and paired differences, bootstrap over problems for calibration,
Wilson over completions for format frequencies (``rlvr_fast.study.stats``). A difference is called improved /
worsened only when its interval excludes 0.
"""

from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

from rlvr_fast.study.plan import StudyPlan
from rlvr_fast.study.state import json_safe, write_json_atomic

__all__ = ["machine_description", "write_study_report"]

REPORT_FILE = "report.md"
STUDY_JSON = "study.json"
FIGURES = {
    "pass_at_k": "pass_at_k.png",
    "pass1_delta": "pass1_delta.png",
    "calibration": "calibration.png",
    "sparsity": "sparsity.png",
    "formats": "formats.png",
    "difficulty": "difficulty.png",
}


# --------------------------------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------------------------------


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if _nan(x) else f"{x:.{digits}f}"


def _ci(d: dict | None, key: str = "mean") -> str:
    """'0.812 [0.700, 0.925]' from {mean|value, ci_low, ci_high}."""
    if d is None:
        return "n/a"
    v = d.get(key, d.get("value"))
    if _nan(v):
        return "n/a"
    if _nan(d.get("ci_low")):
        return _f(v)
    return f"{_f(v)} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]"


def _dci(d: dict | None, key: str = "delta") -> str:
    """'+0.125 [+0.031, +0.219]' for a difference."""
    if d is None:
        return "n/a"
    v = d.get(key, d.get("value"))
    if _nan(v):
        return "n/a"
    if _nan(d.get("ci_low")):
        return f"{v:+.3f}"
    return f"{v:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def _code(text: str) -> str:
    """A markdown code span that survives backticks inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}" if longest else f"`{text}`"


def _pct(x: Any) -> str:
    return "n/a" if _nan(x) else f"{100 * x:.2f}%"


def _verdict_text(v: str) -> str:
    return {
        "improved": "improved (the interval lies above 0)",
        "worsened": "worsened (the interval lies below 0)",
        "no detectable change": "no detectable change (the interval includes 0)",
        "no interval": "not decided (no interval: too few held-out problems to estimate one)",
    }[v]


def _ks(ks: list[int]) -> str:
    return ", ".join(str(k) for k in ks) if ks else "none"


_sanitize = json_safe  # JSON without NaN/inf (null instead) and with string keys


def machine_description() -> dict:
    """CPU model, cores, memory, OS, torch and the accelerator, for the report header."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def provenance_lines(meta: dict, invocations: int | None = None) -> list[str]:
    """The report header's command, machine and date lines (``report_meta``'s record), shared by the single-cell
    report and the cross-model one; ``invocations``: how many ``rlvr-fast study`` calls the summed run time spans."""
    m = meta["machine"]
    device = m["gpu"] or f"CPU ({m['torch_threads']} torch threads)"
    wall = meta.get("wall_seconds_this_invocation")
    spans = f" over {invocations} invocation(s)" if invocations is not None else ""
    return [
        f"- Command: `{meta['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}; torch {m['torch']} on "
        f"{device}",
        f"- Date: {meta['date']}; wall time of this invocation: "
        + (f"{wall / 60:.1f} min" if wall is not None else "n/a")
        + f"; training and evaluation time summed over runs: {meta['run_seconds_total'] / 60:.1f} min{spans}",
    ]


def _plot_pass_at_k(fnd: dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    all_ks: set[int] = set()
    for i, (label, b) in enumerate(fnd["base"].items()):
        ks = sorted(b["curve"])
        all_ks.update(ks)
        ax.errorbar(
            ks,
            [b["curve"][k]["mean"] for k in ks],
            yerr=[
                [b["curve"][k]["mean"] - b["curve"][k]["ci_low"] for k in ks],
                [b["curve"][k]["ci_high"] - b["curve"][k]["mean"] for k in ks],
            ],
            color="black",
            linestyle=styles[i % len(styles)],
            marker="s",
            capsize=3,
            label=label[:48],
            zorder=5,
        )
    colors = _colors(len(fnd["runs"]))
    for color, (key, r) in zip(colors, fnd["runs"].items()):
        ks = sorted(r["curve"])
        ax.plot(ks, [r["curve"][k]["mean"] for k in ks], marker="o", color=color, label=key)
    if all_ks:
        ax.set_xticks(sorted(all_ks))
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(n: int) -> list:
    """n distinct colours (tab10, then tab20 for more runs)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_pass1_delta(fnd: dict, path: str) -> None:
    plt = _plt()
    rows = [(k, r["delta"][1]) for k, r in fnd["runs"].items() if 1 in r["delta"]]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    for i, (_key, d) in enumerate(rows):
        ax.errorbar(
            [d["delta"]],
            [i],
            xerr=[[d["delta"] - d["ci_low"]], [d["ci_high"] - d["delta"]]],
            fmt="o",
            capsize=3,
            color="C0" if d["ci_low"] > 0 else ("C3" if d["ci_high"] < 0 else "C7"),
        )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [k for k, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("pass@1 after - base (paired, 95% CI)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_calibration(fnd: dict, path: str) -> bool:
    kinds = [k for k in ("stated", "agreement") if any(p["reliability"][k] for p in fnd["pairs"])]
    if not kinds:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle=":")
        for pair in fnd["pairs"]:
            for name, rel in pair["reliability"][kind].items():
                pts = [(q, a, n) for q, a, n in zip(rel["mean_confidence"], rel["accuracy"], rel["count"]) if n]
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=f"{name[:40]} ({int(sum(p[2] for p in pts))} completions)",
                )
        ax.set_title("stated confidence" if kind == "stated" else "agreement of the n samples", fontsize=9)
        ax.set_xlabel("confidence (bin mean)")
        ax.set_ylabel("accuracy in the bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_sparsity(fnd: dict, path: str) -> bool:
    runs = list(fnd["runs"])
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(runs) + 2.2))
    ax = axes[0]
    ys = range(len(runs))
    ax.barh(
        [y - 0.2 for y in ys],
        [fnd["runs"][k]["unchanged"]["float32"] for k in runs],
        height=0.4,
        label="float32 (exact)",
    )
    ax.barh(
        [y + 0.2 for y in ys],
        [fnd["runs"][k]["unchanged"]["bfloat16"] for k in runs],
        height=0.4,
        label="bf16 (both rounded)",
    )
    ax.set_yticks(list(ys), runs, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of entries unchanged vs base")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    ax = axes[1]
    ov = fnd["overlap"].get("bfloat16", {"pairs": {}})
    import numpy as np

    mat = np.full((len(runs), len(runs)), np.nan)
    for i in range(len(runs)):
        mat[i, i] = 1.0
    for pair, v in ov["pairs"].items():
        a, b = pair.split("|")
        if a in runs and b in runs and v["jaccard"] is not None:
            mat[runs.index(a), runs.index(b)] = mat[runs.index(b), runs.index(a)] = v["jaccard"]
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(runs)), runs, rotation=90, fontsize=7)
    ax.set_yticks(range(len(runs)), runs, fontsize=7)
    ax.set_title("Jaccard of bf16 changed sets", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_formats(fnd: dict, path: str) -> bool:
    classes = sorted({c for r in fnd["runs"].values() for c, v in r["train"].items() if any(v)})
    if not classes:
        return False
    plt = _plt()
    cols = min(3, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    colors = _colors(len(fnd["runs"]))
    for ax, c in zip(axes.ravel(), classes):
        for color, (key, r) in zip(colors, fnd["runs"].items()):
            if c in r["train"]:
                ax.plot([s + 1 for s in r["steps"]], r["train"][c], marker=".", color=color, label=key)
        ax.set_title(c, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(classes) :]:
        ax.axis("off")
    axes.ravel()[0].set_ylabel("fraction of rollouts")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(6, len(labels)))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_difficulty(fnd: dict, path: str) -> bool:
    rows = fnd["rows"]
    if not rows:
        return False
    plt = _plt()
    rules = sorted({rule for r in rows for rule in r["removed"]})
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for rule in rules:
        vals = [r["removed"].get(rule, 0) for r in rows]
        ax.barh(range(len(rows)), vals, left=left, label=f"removed: {rule}")
        left = [a + b for a, b in zip(left, vals)]
    ax.barh(
        range(len(rows)),
        [r["groups_seen"] - kept for r, kept in zip(rows, left)],
        left=left,
        color="0.85",
        label="kept",
    )
    ax.set_yticks(range(len(rows)), [r["run"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("groups over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


def _missing(missing: dict) -> list[str]:
    return [f"- `{k}` has no result: {why}" for k, why in missing.items()]


def _runs_section(analysis: dict) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | group | seed | status | seconds | base | pass@1 [95% CI] | pass@1 - base [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in analysis["runs"]:
        secs = "n/a" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(
            f"| `{r['run']}` | {r['group']} | {r['seed']} | {r['status']} | {secs} | {r['base']} | "
            f"{_ci(r['pass_at_1'])} | {_dci(r['delta_pass_at_1'])} |"
        )
    bad = [r for r in analysis["runs"] if r["status"] in ("failed", "skipped", "interrupted", "running", "pending")]
    if bad:
        lines.append("")
        for r in bad:
            if r["status"] == "failed":
                err = r["error"] or {}
                lines.append(
                    f"- `{r['run']}` failed after {r['attempts']} attempt(s): `{err.get('type')}: "
                    f"{(err.get('message') or '')[:300]}` (traceback in study.json)"
                )
            elif r["status"] == "skipped":
                lines.append(f"- `{r['run']}` was skipped: {r['reason']}")
            else:
                lines.append(f"- `{r['run']}` is {r['status']}: rerun the same command to continue it")
    settings = analysis["base_settings"]
    if len(settings) > 1:
        lines += ["", "Base-model evaluations (one per evaluation setting, shared by the runs that use it):"]
        for label, s in settings.items():
            lines.append(f"- {label}: runs {', '.join(f'`{k}`' for k in s['runs'])}")
    return lines


def _passk_section(fnd: dict) -> list[str]:
    lines = [
        "## 1. pass@k curves and where they cross",
        "",
        f"![pass@k]({FIGURES['pass_at_k']}) ![pass@1 vs base]({FIGURES['pass1_delta']})",
        "",
    ]
    if not fnd["runs"] and not fnd["base"]:
        return lines + ["No evaluation finished."]
    n = max([max(b["curve"]) for b in fnd["base"].values()] + [max(r["curve"]) for r in fnd["runs"].values()])
    lines += ["| model | " + " | ".join(f"pass@{k}" for k in range(1, n + 1)) + " |", "|---|" + "---|" * n]
    for label, b in fnd["base"].items():
        lines.append(f"| {label} | " + " | ".join(_ci(b["curve"].get(k)) for k in range(1, n + 1)) + " |")
    for key, r in fnd["runs"].items():
        lines.append(f"| `{key}` | " + " | ".join(_ci(r["curve"].get(k)) for k in range(1, n + 1)) + " |")
    lines.append("")
    for key, r in fnd["runs"].items():
        d, ks = r["delta"], sorted(r["delta"])
        if not ks:
            lines.append(f"- `{key}`: no base evaluation to compare with.")
            continue
        above, below = r["significantly_above"], r["significantly_below"]
        if above or below:
            sig = (
                f"the paired difference's interval excludes 0 at k = {_ks(above)} (above the base) and k = "
                f"{_ks(below)} (below)"
            )
        else:
            sig = f"at no k = 1..{ks[-1]} does the paired difference's interval exclude 0"
        equal = [k for k in ks if k not in r["above"] and k not in r["below"]]
        lo = min(ks, key=lambda k: d[k]["delta"])
        hi = max(ks, key=lambda k: d[k]["delta"])
        span = f"difference from {_dci(d[lo])} at k={lo} to {_dci(d[hi])} at k={hi}"
        if r["crossings"]:
            where = "; ".join(f"between k={a} ({_dci(d[a])}) and k={b} ({_dci(d[b])})" for a, b in r["crossings"])
            text = (
                f"above {r['base']} at k = {_ks(r['above'])}, below at k = {_ks(r['below'])}: the curves cross {where}"
            )
        elif not r["above"] and not r["below"]:
            text = f"pass@k equal to {r['base']}'s at every k = 1..{ks[-1]}: the curves coincide"
        else:
            side, at = ("above", r["above"]) if r["above"] else ("below", r["below"])
            text = (
                f"{side} {r['base']} at k = {_ks(at)}"
                + (f" and equal at k = {_ks(equal)}" if equal else "")
                + f" ({span}): the curves do not cross for k <= {ks[-1]}"
            )
        lines.append(f"- `{key}`: {text}; {sig}.")
    return lines


def _reward_section(fnd: dict) -> list[str]:
    t = fnd["task"]
    task = (
        f"the built-in arithmetic task (`{t['task_preset']}`), contamination-free by construction"
        if t["clean"]
        else f"task `{t['task']}` (a data file: its contamination is not checked here)"
    )
    lines = [f"## 2. Which rewards improved pass@1 over the base, on {task}", ""]
    if not fnd["rows"]:
        return lines + ["No reward arm finished."] + _missing(fnd["missing"])
    lines += ["| run | rewards | base pass@1 | pass@1 | difference (paired) | verdict |", "|---|---|---|---|---|---|"]
    for row in fnd["rows"]:
        lines.append(
            f"| `{row['run']}` | {row['rewards']} | {_ci(row['base_pass_at_1'])} | {_ci(row['pass_at_1'])} | "
            f"{_dci(row['delta'])} | {row['verdict']} |"
        )
    lines.append("")
    for row in fnd["rows"]:
        lines.append(
            f"- `{row['run']}`: pass@1 {_ci(row['base_pass_at_1'])} ({row['base']}) -> "
            f"{_ci(row['pass_at_1'])}, difference {_dci(row['delta'])}: {_verdict_text(row['verdict'])}."
        )
    lines.append("")
    lines.append(
        f"Improved pass@1 over the base: {', '.join(fnd['improved']) or 'no reward arm'}. Did not: "
        f"{', '.join(fnd['not_improved']) or 'none'}."
    )
    return lines + _missing(fnd["missing"])


def _sample_section(fnd: dict) -> list[str]:
    k = max([row["k"] for row in fnd["rows"]], default=None)
    lines = [f"## 3. pass@k at the largest k (k = {k if k else 'n'}): nsr vs psr vs all", ""]
    if not fnd["rows"]:
        return lines + ["No sample arm finished."] + _missing(fnd["missing"])
    lines += ["| run | pass@k [95% CI] | difference to its base (paired) |", "|---|---|---|"]
    for row in fnd["rows"]:
        lines.append(f"| `{row['run']}` ({row['label']}) | {_ci(row['pass_at_k'])} | {_dci(row['delta_vs_base'])} |")
    lines.append("")
    label = {row["run"]: row["label"] for row in fnd["rows"]}
    value = {row["run"]: row["pass_at_k"] for row in fnd["rows"]}
    for p in fnd["pairs"]:
        a, b = p["a"], p["b"]
        distinct = p["delta"]["ci_low"] > 0 or p["delta"]["ci_high"] < 0
        lines.append(
            f"- {label[a]} (`{a}`) pass@{p['k']} = {_ci(value[a])} vs {label[b]} (`{b}`) {_ci(value[b])}: "
            f"paired difference {_dci(p['delta'])}; the intervals "
            f"{'overlap' if p['intervals_overlap'] else 'do not overlap'}, and the paired difference is "
            f"{'distinguishable' if distinct else 'not distinguishable'}"
            f" from 0."
        )
    return lines + _missing(fnd["missing"])


_METRIC_NAMES = {"ece": "ECE", "brier": "Brier", "auroc": "AUROC"}


def verdict_word(d: dict) -> str:
    """Where a difference's interval lies relative to 0."""
    if _nan(d.get("ci_low")):
        return "no interval"
    if d["ci_low"] > 0:
        return "interval above 0"
    if d["ci_high"] < 0:
        return "interval below 0"
    return "interval includes 0"


def _cal_row(name: str, p1: dict | None, m: dict | None) -> str:
    if m is None:
        return f"| {name} | {_ci(p1)} | no per-completion data | | | |"
    return f"| {name} | {_ci(p1)} | {_ci(m['answered'])} | {_ci(m['ece'])} | {_ci(m['brier'])} | {_ci(m['auroc'])} |"


def _cal_sentence(name: str, p1: dict | None, m: dict | None, kind: str) -> str | None:
    if m is None:
        return None
    if kind == "stated" and (_nan(m["answered"]["value"]) or m["answered"]["value"] == 0):
        return (
            f"- {name} (pass@1 {_ci(p1)}) stated no parseable confidence in any held-out completion: its ECE, "
            f"Brier and AUROC of stated confidence are undefined."
        )
    over = f", over the {m['answered_count']} of {m['total']} completions that stated one" if kind == "stated" else ""
    auroc = (
        f"AUROC {_ci(m['auroc'])}"
        if not _nan(m["auroc"]["value"])
        else "AUROC undefined (its answers with a confidence are all right or all wrong)"
    )
    if not _nan(m["auroc"]["value"]) and m["auroc"]["defined_in"] < m["resamples"]:
        auroc += f" (its interval from the {m['auroc']['defined_in']} of {m['resamples']} resamples where it exists)"
    return f"- {name} at pass@1 {_ci(p1)}: ECE {_ci(m['ece'])}, Brier {_ci(m['brier'])}, {auroc}{over}."


def _diff_sentence(pair: dict, kind: str) -> str | None:
    diff = pair["difference"].get(kind)
    if not diff:
        return None
    parts = []
    for metric, label in _METRIC_NAMES.items():
        d = diff[metric]
        parts.append(f"{label} undefined" if _nan(d["value"]) else f"{label} {_dci(d)} ({verdict_word(d)})")
    return (
        f"- {pair['brier']} minus {pair['reference']} on the same problems (paired bootstrap over problems): "
        + "; ".join(parts)
        + "."
    )


def _calibration_section(fnd: dict) -> list[str]:
    lines = ["## 4. Calibration: the brier arm vs the reference arm, at their accuracy", ""]
    if fnd.get("note"):
        lines.append(fnd["note"] + ".")
    if fnd["pairs"]:
        lines += [f"![reliability]({FIGURES['calibration']})", ""]
    for p in fnd["pairs"]:
        names = [p["brier"]] + ([p["reference"]] if p["reference"] else []) + [p["base"]]
        for kind, title in (
            ("stated", "Stated confidence (`<confidence>q</confidence>`, what the brier reward trains; RLCR):"),
            (
                "agreement",
                "Agreement of the n samples as the confidence (the share of a problem's "
                "samples giving the same answer; every model has it, no elicitation):",
            ),
        ):
            lines += [
                title,
                "",
                "| model | pass@1 | has a confidence | ECE | Brier | AUROC |",
                "|---|---|---|---|---|---|",
            ]
            lines += [_cal_row(n, p["pass_at_1"].get(n), p[kind].get(n)) for n in names if n in p["pass_at_1"]]
            lines.append("")
            lines += [t for n in names if (t := _cal_sentence(n, p["pass_at_1"].get(n), p[kind].get(n), kind))]
            d = _diff_sentence(p, kind)
            if d:
                lines.append(d)
            elif p["reference"] and not p["paired"]:
                lines.append(
                    f"- {p['brier']} and {p['reference']} were evaluated under different settings, so no "
                    f"paired difference is computed."
                )
            lines.append("")
        if p.get("note"):
            lines += [f"- {p['note']}.", ""]
    if fnd["all_agreement"]:
        lines += [
            "Agreement calibration of every model:",
            "",
            "| model | pass@1 | ECE | Brier | AUROC |",
            "|---|---|---|---|---|",
        ]
        for name, m in fnd["all_agreement"].items():
            lines.append(
                f"| {name} | {_ci(m['pass_at_1'])} | {_ci(m['ece'])} | {_ci(m['brier'])} | {_ci(m['auroc'])} |"
            )
        lines.append("")
    return lines + _missing(fnd["missing"])


def _sparsity_section(fnd: dict) -> list[str]:
    lines = [
        "## 5. Update sparsity and the overlap of the changed sets",
        "",
        f"![sparsity]({FIGURES['sparsity']})",
        "",
        f"An entry is unchanged when it equals the base model's exactly (atol {fnd['atol']}) in float32, or after "
        "rounding both to bf16 (Mukherjee et al. 2025 measure on bf16).",
        "",
        "| run | unchanged (float32) | unchanged (bf16) | changes below bf16 resolution |",
        "|---|---|---|---|",
    ]
    for key, r in fnd["runs"].items():
        f32, bf = r["unchanged"]["float32"], r["unchanged"]["bfloat16"]
        lines.append(f"| `{key}` | {_pct(f32)} | {_pct(bf)} | {_pct(r['hidden_by_bf16'])} of the changed entries |")
    lines.append("")
    for key, r in fnd["runs"].items():
        lines.append(
            f"- `{key}` left {_pct(r['unchanged']['float32'])} of the entries bit-identical in float32 and "
            f"{_pct(r['unchanged']['bfloat16'])} unchanged in bf16: {_pct(r['hidden_by_bf16'])} of its "
            f"float32 changes are smaller than the bf16 resolution of the weight."
        )
    for dtype in ("bfloat16", "float32"):
        s, a = fnd["seed_pairs"].get(dtype), fnd["arm_pairs"].get(dtype)
        if s and s["pairs"]:
            lines.append(
                f"- Between seeds of the same arm ({dtype}, {s['pairs']} pair(s)): Jaccard "
                f"{_f(s['mean_jaccard'])} on average (min {_f(s['min_jaccard'])}, max {_f(s['max_jaccard'])})"
                f" vs {_f(s['mean_chance_jaccard'])} for random sets of the same sizes."
            )
        elif dtype == "bfloat16":
            lines.append("- No arm finished with two seeds: the seed overlap is not measured.")
        if a and a["pairs"]:
            lines.append(
                f"- Between different arms ({dtype}, {a['pairs']} pair(s)): Jaccard "
                f"{_f(a['mean_jaccard'])} on average (min {_f(a['min_jaccard'])}, max "
                f"{_f(a['max_jaccard'])}) vs "
                f"{_f(a['mean_chance_jaccard'])} by chance."
            )
    for e in fnd["sparse_reuse"]:
        c = e["containment_fp32_in_mask"]
        inside = c["inside"] / c["inner"] if c["inner"] else float("nan")
        text = (
            f"- `{e['run']}` trained only the {_pct(e['mask_density'])} of entries `{e['mask_from']}` changed "
            f"(bf16): {_pct(inside)} of its {c['inner']} float32 changes lie inside that mask ({c['outside']} "
            f"outside)"
        )
        if "delta_vs_dense" in e:
            text += (
                f"; pass@1 {_ci(e['pass_at_1'])} vs {_ci(e['dense_pass_at_1'])} dense, paired difference "
                f"{_dci(e['delta_vs_dense'])}: {_verdict_text(e['verdict_vs_dense'])}"
            )
        lines.append(text + ".")
    ov = fnd["overlap"].get("bfloat16", {"pairs": {}})
    if ov["pairs"]:
        runs = list(fnd["runs"])
        lines += [
            "",
            "Jaccard overlap of the bf16 changed sets (chance level in parentheses):",
            "",
            "| | " + " | ".join(f"`{k}`" for k in runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        for a in runs:
            cells = []
            for b in runs:
                v = ov["pairs"].get(f"{a}|{b}") or ov["pairs"].get(f"{b}|{a}")
                cells.append("1" if a == b else (f"{_f(v['jaccard'], 2)} ({_f(v['chance_jaccard'], 2)})" if v else ""))
            lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    if fnd["runs"]:
        first = next(iter(fnd["runs"]))
        kinds = fnd["runs"][first]["by_kind"]
        lines += [
            "",
            f"Unchanged fraction by tensor kind for `{first}`:",
            "",
            "| tensor kind | entries | float32 | bf16 |",
            "|---|---|---|---|",
        ]
        for kind, v in sorted(kinds.items(), key=lambda kv: -kv[1]["numel"]):
            lines.append(f"| `{kind}` | {v['numel']} | {_pct(v['float32'])} | {_pct(v['bfloat16'])} |")
    return lines + _missing(fnd["missing"])


def _formats_section(fnd: dict) -> list[str]:
    lines = ["## 6. Format frequency over training", ""]
    if fnd.get("note"):
        return lines + [fnd["note"] + "."]
    classes = list(fnd["classes"]) + ["unmatched"]
    lines += [
        f"![formats]({FIGURES['formats']})",
        "",
        "Classes (regex searched in each completion): "
        + ", ".join(f"`{c}` = {_code(p)}" for c, p in fnd["classes"].items())
        + ".",
        "",
        "Fraction of training rollouts at the first -> last step, and on the held-out set after training "
        "(accuracy within the class in parentheses):",
        "",
        "| run | " + " | ".join(f"`{c}`" for c in classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for label, b in fnd["base"].items():
        lines.append(
            f"| {label} (held-out) | "
            + " | ".join(f"{_f(b[c]['frequency'], 2)} ({_f(b[c]['accuracy'], 2)})" if c in b else "" for c in classes)
            + " |"
        )
    for key, r in fnd["runs"].items():
        cells = []
        for c in classes:
            first, last, e = r["first_step"].get(c), r["last_step"].get(c), r["eval_after"].get(c)
            cell = f"{_f(first['frequency'], 2)} -> {_f(last['frequency'], 2)}" if first and last else ""
            if e:
                cell += f"; {_f(e['frequency'], 2)} ({_f(e['accuracy'], 2)})"
            cells.append(cell)
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines.append("")
    for key, r in fnd["runs"].items():
        if not r["first_step"]:
            continue
        a, b = r["dominant_first_step"], r["dominant_last_step"]
        fa, lb = r["first_step"][a], r["last_step"][b]
        text = (
            f"- `{key}`: the most frequent class went from `{a}` ({_ci(fa, 'frequency')}) at step "
            f"{r['steps'][0] + 1} to `{b}` ({_ci(lb, 'frequency')}) at step {r['steps'][-1] + 1}"
        )
        if a != b:
            text += f" (`{a}` then {_ci(r['last_step'][a], 'frequency')})"
        if "dominant_eval_after" in r:
            e = r["dominant_eval_after"]
            text += (
                f"; on the held-out set after training `{e}` {_ci(r['eval_after'][e], 'frequency')} with accuracy "
                f"{_f(r['eval_after'][e]['accuracy'])} within it"
            )
        lines.append(text + ".")
    return lines + _missing(fnd["missing"])


def _difficulty_section(fnd: dict) -> list[str]:
    lines = ["## 7. Difficulty filters: groups removed and accuracy", ""]
    if not fnd["rows"]:
        return lines + ["No difficulty arm finished."] + _missing(fnd["missing"])
    lines += [
        f"![difficulty]({FIGURES['difficulty']})",
        "",
        "| run | filter | groups seen | removed (by rule) | all-equal groups | completions updated | mean solve "
        "rate | pass@1 | vs unfiltered (paired) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fnd["rows"]:
        rules = ", ".join(f"{k}={v}" for k, v in r["rules"].items() if v not in (None, False)) or "none"
        removed = ", ".join(f"{k}: {v}" for k, v in r["removed"].items()) or "0"
        lines.append(
            f"| `{r['run']}` | {rules} | {r['groups_seen']} | {removed} | {r['all_equal_groups']} | "
            f"{r['completions_updated']} | {_f(r['mean_solve_rate'])} | {_ci(r['pass_at_1'])} | "
            f"{_dci(r.get('delta_vs_baseline'))} |"
        )
    lines.append("")
    for r in fnd["rows"]:
        if r["removed_total"] or any(v not in (None, False) for v in r["rules"].values()):
            text = (
                f"- `{r['run']}` removed {r['removed_total']} of {r['groups_seen']} groups ("
                + (", ".join(f"{k}: {v}" for k, v in r["removed"].items()) or "no rule fired")
                + ")"
            )
        else:
            text = (
                f"- `{r['run']}` (no filter) kept all {r['groups_seen']} groups; {r['all_equal_groups']} of them "
                f"had all-equal rewards (what the all-equal filter would have removed)"
            )
        text += f"; pass@1 {_ci(r['pass_at_1'])}"
        if "delta_vs_baseline" in r:
            text += (
                f", paired difference to `{r['baseline']}` {_dci(r['delta_vs_baseline'])}: "
                f"{_verdict_text(r['verdict_vs_baseline'])}"
            )
        lines.append(text + ".")
    return lines + _missing(fnd["missing"])


def _arms_section(plan: StudyPlan) -> list[str]:
    lines = ["## Arms", "", "| arm | group | overrides | what it tests |", "|---|---|---|---|"]
    for name, arm in plan.arms.items():
        ov = ", ".join(f"{k}={v!r}" for k, v in arm.overrides.items() if k != "prompt_template")
        if "prompt_template" in arm.overrides:
            ov += ", prompt_template=(asks for a confidence)"
        extra = f"; mask from `{arm.mask_from}`" if arm.mask_from else ""
        lines.append(f"| `{name}` | {arm.group} | {ov.replace('|', '/')}{extra} | {arm.doc} |")
    return lines


def report_meta(state: dict, meta: dict | None) -> dict:
    """The report header's facts: ``meta`` given, plus the machine, the date, the last invocation's command and wall
    time, and the runs' total seconds (from the study state)."""
    session = (state.get("sessions") or [{}])[-1]
    meta = dict(meta or {})
    meta.setdefault("machine", machine_description())
    meta.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    meta.setdefault("command", session.get("command"))
    if "started_epoch" in session:
        meta.setdefault("wall_seconds_this_invocation", time.time() - session["started_epoch"])
    meta["run_seconds_total"] = sum(r.get("seconds") or 0 for r in state["runs"].values())
    return meta


def write_study_report(plan: StudyPlan, state: dict, analysis: dict, meta: dict | None = None) -> tuple[str, str]:
    """Write report.md, the figures and study.json into the study folder; returns (report path, study.json path)."""
    out = plan.output_dir
    fnd = analysis["findings"]
    meta = report_meta(state, meta)
    meta["invocations"] = len(state.get("sessions") or [])

    _plot_pass_at_k(fnd["pass_at_k"], os.path.join(out, FIGURES["pass_at_k"]))
    _plot_pass1_delta(fnd["pass_at_k"], os.path.join(out, FIGURES["pass1_delta"]))
    _plot_calibration(fnd["calibration"], os.path.join(out, FIGURES["calibration"]))
    _plot_sparsity(fnd["update_sparsity"], os.path.join(out, FIGURES["sparsity"]))
    _plot_formats(fnd["formats"], os.path.join(out, FIGURES["formats"]))
    _plot_difficulty(fnd["difficulty"], os.path.join(out, FIGURES["difficulty"]))

    primary = plan.run(plan.primary).config
    statuses = [r["status"] for r in analysis["runs"]]
    lines = [
        "# rlvr_fast study: does reward engineering matter for this model?",
        "",
        *provenance_lines(meta, invocations=meta["invocations"]),
        f"- Preset `{plan.preset}`: model `{primary['model']}`, task `{primary['task']}` "
        f"(`{primary['task_preset']}`), {primary['steps']} steps of {primary['prompts_per_step']} prompts x "
        f"{primary['group_size']} completions (at most {primary['max_completion_length']} new tokens), lr "
        f"{primary['lr']}, optimizer `{primary['optimizer']}`; held-out evaluation of {primary['eval_size']} "
        f"problems x n={primary['eval_samples']} samples at temperature {primary['eval_temperature']}",
        f"- Runs: {statuses.count('done')} done, {statuses.count('failed')} failed, {statuses.count('skipped')} "
        f"skipped, {len(statuses) - statuses.count('done') - statuses.count('failed') - statuses.count('skipped')} "
        f"not finished, of {len(statuses)}; every arm starts from the same base weights, each run folder "
        f"(`arms/<arm>/seed<i>/`) is a normal trainer run.",
        "- Intervals are 95%: normal over problems for pass@k and paired differences, bootstrap over problems for "
        "calibration, Wilson over completions for format frequencies. A difference counts as improved or worsened "
        "only when its interval excludes 0.",
        "",
    ]
    lines += _runs_section(analysis) + [""]
    lines += _passk_section(fnd["pass_at_k"]) + [""]
    lines += _reward_section(fnd["reward"]) + [""]
    lines += _sample_section(fnd["sample"]) + [""]
    lines += _calibration_section(fnd["calibration"]) + [""]
    lines += _sparsity_section(fnd["update_sparsity"]) + [""]
    lines += _formats_section(fnd["formats"]) + [""]
    lines += _difficulty_section(fnd["difficulty"]) + [""]
    from rlvr_fast.study.update_modes import update_modes_section  # optimizer bytes, memory, update rank per run

    lines += update_modes_section(analysis.get("update_modes", {}))  # where the preset recorded update ranks
    from rlvr_fast.study.shortcuts_report import shortcuts_section  # the hard-problem arms: damage and shortcuts

    lines += shortcuts_section(plan, state)
    from rlvr_fast.study.trajectories_report import trajectories_section  # trajectory processing: cost, comparisons

    lines += trajectories_section(plan, state)
    lines += _arms_section(plan) + ["", f"Every number above is in [`{STUDY_JSON}`]({STUDY_JSON})."]
    report = os.path.join(out, REPORT_FILE)
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, report)

    study = {
        "format": "rlvr_fast.study/1",
        "meta": meta,
        "plan": {
            "preset": plan.preset,
            "output_dir": plan.output_dir,
            "primary": plan.primary,
            "base_overrides": plan.base_overrides,
            "arms": {
                n: {
                    "group": a.group,
                    "doc": a.doc,
                    "overrides": dict(a.overrides),
                    "mask_from": a.mask_from,
                    "source": a.source,
                }
                for n, a in plan.arms.items()
            },
            "runs": [
                {
                    "key": r.key,
                    "arm": r.arm,
                    "seed": r.config["seed"],
                    "run_dir": r.run_dir,
                    "eval_key": r.eval_key,
                    "depends_on": r.depends_on,
                }
                for r in plan.runs
            ],
        },
        "state": {k: {f: v for f, v in e.items()} for k, e in state["runs"].items()},
        **analysis,
    }
    path = os.path.join(out, STUDY_JSON)
    write_json_atomic(path, _sanitize(study))
    return report, path
