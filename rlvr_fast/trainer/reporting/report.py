"""The run's summary: the before/after table printed at the end, PNG plots and a short report.md."""

from __future__ import annotations

import json
import os

from rlvr_fast.eval import pass_at_k_delta


def before_after_rows(before: dict, after: dict) -> list[dict]:
    """One row per k: pass@k before and after with 95% CIs, and the paired difference with its CI."""
    rows = []
    n_b, n_a = before["n"], after["n"]
    for k in sorted(int(k) for k in before["pass_at_k"]):
        b, a = before["pass_at_k"][k], after["pass_at_k"][k]
        d = pass_at_k_delta(
            [n_b] * len(before["correct_counts"]),
            before["correct_counts"],
            [n_a] * len(after["correct_counts"]),
            after["correct_counts"],
            k,
        )
        rows.append({"k": k, "before": b, "after": a, "delta": d.delta, "delta_ci": (d.ci_low, d.ci_high)})
    return rows


def _ci(x: dict) -> str:
    return f"{x['mean']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"


def table(rows: list[dict]) -> str:
    lines = ["| k | pass@k before [95% CI] | pass@k after [95% CI] | after - before [95% CI] |", "|---|---|---|---|"]
    for r in rows:
        lo, hi = r["delta_ci"]
        lines.append(
            f"| {r['k']} | {_ci(r['before'])} | {_ci(r['after'])} | {r['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


def plot_rewards(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if "reward_mean" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [m["reward_mean"] for m in metrics if "reward_mean" in m], label="reward (mean)")
    ax.plot(steps, [m["solve_rate"] for m in metrics if "reward_mean" in m], label="solve rate")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pass_at_k(before: dict, after: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, res in (("before", before), ("after", after)):
        ks = sorted(int(k) for k in res["pass_at_k"])
        mean = [res["pass_at_k"][k]["mean"] for k in ks]
        lo = [res["pass_at_k"][k]["ci_low"] for k in ks]
        hi = [res["pass_at_k"][k]["ci_high"] for k in ks]
        ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, lo, hi, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output_dir: str, cfg_dict: dict, before: dict, after: dict, metrics: list[dict], extra: dict) -> str:
    rows = before_after_rows(before, after)
    plot_rewards(metrics, os.path.join(output_dir, "reward_curve.png"))
    plot_pass_at_k(before, after, os.path.join(output_dir, "pass_at_k.png"))
    steps = [m for m in metrics if "reward_mean" in m]
    lines = [
        "# rlvr_fast run report",
        "",
        f"model `{cfg_dict['model']}`, task `{cfg_dict['task']}` ({cfg_dict['task_preset']}), estimator "
        f"`{cfg_dict['estimator']}`, sample mode `{cfg_dict['sample_mode']}`, loss `{cfg_dict['loss_type']}`, rewards "
        f"{cfg_dict['rewards']}, optimizer `{cfg_dict['optimizer']}`, lr {cfg_dict['lr']}, {len(steps)} steps of "
        f"{cfg_dict['prompts_per_step']} prompts x {cfg_dict['group_size']} completions.",
        "",
        f"Held-out evaluation: {len(after['correct_counts'])} problems x n={after['n']} samples; pass@k unbiased "
        "(Chen et al. 2021); CIs are normal approximations over problems, the difference is paired by problem.",
        "",
        table(rows),
        "",
        "![reward](reward_curve.png) ![pass@k](pass_at_k.png)",
        "",
        "## Run",
        "",
        "```json",
        json.dumps(extra, indent=1),
        "```",
    ]
    if after.get("calibration"):
        lines += [
            "",
            "## Calibration (after)",
            "",
            "```json",
            json.dumps({"before": before.get("calibration"), "after": after["calibration"]}, indent=1),
            "```",
        ]
    if after.get("formats"):
        lines += [
            "",
            "## Format frequency",
            "",
            "```json",
            json.dumps({"before": before["formats"], "after": after["formats"]}, indent=1),
            "```",
        ]
    lines += ["", "## Sample completions after training", ""]
    for s in after["samples"]:
        lines.append(
            f"- `{s['prompt']}` (answer {s['answer']}, correct={bool(s['correct'])}): `{s['completion'][:200]!r}`"
        )
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
