"""JSONL task files: one JSON object per line, ``{"prompt": ..., "answer": ...}`` plus any optional fields.

Loading checks every line and stops at the first bad one with a ``JSONLFormatError`` (a ValueError) that names the file,
the 1-based line number and the problem: invalid UTF-8, invalid JSON, not an object, a missing required field, or a
field of the wrong type. Blank lines are skipped. ``prompt`` must be a non-empty string; ``answer`` a string, or a
JSON number (converted with ``str``, so ``42`` -> ``"42"``; booleans are refused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["JSONLFormatError", "load_jsonl", "parse_jsonl_lines", "save_jsonl"]


class JSONLFormatError(ValueError):
    """A malformed line; ``.source`` and ``.line`` (1-based) locate it."""

    def __init__(self, source: str, line: int, message: str):
        super().__init__(f"{source}, line {line}: {message}")
        self.source = source
        self.line = line


def _check_record(obj: Any, source: str, line: int, required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise JSONLFormatError(source, line, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise JSONLFormatError(source, line, f"missing field(s) {missing}; the line has {sorted(obj)}")
    if "prompt" in required and (not isinstance(obj["prompt"], str) or not obj["prompt"].strip()):
        raise JSONLFormatError(source, line, f"field 'prompt' must be a non-empty string, got {obj['prompt']!r:.80}")
    if "answer" in obj:
        a = obj["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise JSONLFormatError(source, line, f"field 'answer' must be a string or a number, got {type(a).__name__}")
        obj["answer"] = a if isinstance(a, str) else str(a)
    return obj


def parse_jsonl_lines(
    lines: Iterable[bytes | str], *, source: str = "<jsonl>", required: Sequence[str] = ("prompt", "answer")
) -> list[dict[str, Any]]:
    """Parse JSONL lines (bytes or str) into records; see the module docstring for the checks."""
    records = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JSONLFormatError(source, number, f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise JSONLFormatError(source, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        records.append(_check_record(obj, source, number, required))
    return records


def load_jsonl(path: str | os.PathLike[str], *, required: Sequence[str] = ("prompt", "answer")) -> list[dict[str, Any]]:
    """Records of a JSONL file (read as bytes so a bad UTF-8 line is reported with its number)."""
    with open(path, "rb") as f:
        return parse_jsonl_lines(f, source=os.fspath(path), required=required)


def save_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write records one JSON object per line (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
