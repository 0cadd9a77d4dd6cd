"""What a run writes as it goes: metrics.jsonl (one JSON object per step, plus one per periodic evaluation) and a
progress bar.

A step's record holds its update's metrics (loss, grad_norm, clip fractions, mean ratio / KL / entropy, tokens) as
``iteration_metrics`` lays them out: with ``num_iterations`` > 1 optimizer steps on one batch, the last iteration's at
the top level and every iteration's, in order, under ``"iterations"``. Its ``seconds`` are split into
``time_<part>_s`` fields (``step_timer``), which the progress bar shows compactly (``step_breakdown``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Any

import torch

from rlvr_fast.trainer.reporting.step_timer import part_key

_PROC_STATUS, _PROC_CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def _linux_peak_rss() -> int | None:
    """VmHWM of /proc/self/status in bytes (the peak RSS since start or since the last ``reset_peak_memory``)."""
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU; the process's peak RSS on the CPU (on Linux since the last
    ``reset_peak_memory``, else since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _linux_peak_rss() if sys.platform.startswith("linux") else None
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak for ``peak_memory_bytes``: CUDA's allocator peak; on Linux the peak RSS, by writing "5" to
    /proc/self/clear_refs (Linux >= 4.0: VmHWM becomes the current RSS). Several runs in one process (a study) then
    each get their own peak. False where the peak cannot be reset (another OS, a locked-down /proc): the peak then
    stays the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# Fields of a step record measured on the machine (wall time and its split, memory, each part's floor and fraction of
# it): two runs of the same steps differ in them; every other field is the step's result and reproduces exactly
MEASURED_FIELDS = frozenset({"seconds", "tokens_per_s", "peak_memory_bytes"})
MEASURED_PREFIXES = ("time_", "floor_")


def reproducible_fields(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its measured fields (``MEASURED_FIELDS``, ``MEASURED_PREFIXES``): what a resumed or
    replayed run must give again."""
    return {k: v for k, v in record.items() if k not in MEASURED_FIELDS and not k.startswith(MEASURED_PREFIXES)}


def iteration_metrics(iterations: list[dict[str, Any]]) -> dict[str, Any]:
    """The update's part of a step record from each optimizer step's metrics, in order: the last iteration's at the top
    level (the step that produced the new weights; the only one when num_iterations == 1) and, when there were several,
    the list of all under ``"iterations"`` (the first is on-policy: ratio 1; the later ones show the drift). Empty when
    nothing was updated."""
    if not iterations:
        return {}
    out = dict(iterations[-1])
    if len(iterations) > 1:
        out["iterations"] = [dict(it) for it in iterations]
    return out


METRICS_FILE = "metrics.jsonl"  # in the run's output_dir


class MetricsLogError(ValueError):
    """A metrics.jsonl damaged before its last line (a crash cuts short only the last): names the file and line."""


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step", -1), int):
        return None
    return record


def read_metrics_lines(path: str) -> tuple[list[tuple[str, dict]], str | None]:
    """The records of ``path`` as (line without its newline, record), and a note when its last line was a partial
    record and was left out (None otherwise).

    A crash or a full disk can cut short only the last line (the log is appended to); that line is left out, the
    note naming the file and line. A line before the last that is no JSON object raises MetricsLogError."""
    with open(path, encoding="utf-8", errors="replace") as f:  # a cut-short UTF-8 character: unparseable, not fatal
        numbered = [(n, line) for n, line in enumerate(f.read().split("\n"), start=1) if line.strip()]
    records, note = [], None
    for i, (n, line) in enumerate(numbered):
        record = _record(line)
        if record is not None:
            records.append((line, record))
        elif i == len(numbered) - 1:
            note = f"{path} line {n} is a partial record (a write cut short by a crash or a full disk): left out"
        else:
            raise MetricsLogError(
                f"{path} line {n} is not a JSON record ({line[:60]!r}) and is not the last line, which a crash would "
                f"cut short: the log is damaged; repair or remove that line, or start a new run (another output_dir)"
            )
    return records, note


def check_metrics_log(output_dir: str) -> None:
    """Before a resumed run loads its model: its metrics.jsonl readable (``read_metrics_lines``; no file is fine)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if os.path.exists(path):
        read_metrics_lines(path)


class MetricsLog:
    """Appends one line per step to ``metrics.jsonl``. On resume, lines after the resumed step are dropped first,
    so the file reads exactly as an uninterrupted run's would; a last line cut short by a crash is dropped, with a
    message (``log``; stderr by default) naming the file and line."""

    def __init__(self, path: str, resume_step: int | None = None, log=None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            records, note = read_metrics_lines(path)
            if note is not None:
                (log or (lambda msg: print(msg, file=sys.stderr)))(f"resume: {note}")
            kept = [line + "\n" for line, record in records if record.get("step", -1) < resume_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in open(self.path) if line.strip()]


# The progress bar's short names of the step's parts (step_timer.STEP_PARTS and "other"), in the step's order.
BREAKDOWN_LABELS = {
    "generation": "gen",
    "scoring": "score",
    "fixed_logprobs": "lp",
    "forward_backward": "fb",
    "optimizer": "opt",
    "weight_sync": "sync",
    "other": "other",
}


def step_breakdown(record: dict[str, Any], min_seconds: float = 0.05) -> str:
    """Where a step's seconds went, compactly: 'gen 4.1s fb 6.2s opt 0.3s' (parts under ``min_seconds`` left out;
    generation and forward+backward always shown)."""
    parts = []
    for part, label in BREAKDOWN_LABELS.items():
        seconds = record.get(part_key(part))
        if seconds is not None and (seconds >= min_seconds or part in ("generation", "forward_backward")):
            parts.append(f"{label} {seconds:.1f}s")
    return " ".join(parts)


class Progress:
    """A tqdm bar showing step, reward, tokens/s, where the step's seconds went, and the ETA (silent when disabled)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        """Advance by one step with its metrics record (``Trainer._step_record``)."""
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"reward={record['reward_mean']:.3f} tok_s={record['tokens_per_s']:.0f} {step_breakdown(record)}"
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MemoryLog:
    """metrics.jsonl's stand-in on ranks other than 0: the records kept in memory, nothing written."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(json.loads(json.dumps(_jsonable(record))))

    def read(self) -> list[dict]:
        return list(self.records)
