"""JSONL task files: one JSON object per line, ``{"prompt": ..., "answer": ...}`` plus any optional fields.

Loading checks every line and stops at the first bad one with a ``JSONLFormatError`` (a ValueError) that names the file,
the 1-based line number and the problem: a line over ``MAX_LINE_BYTES`` (read no further than that), invalid UTF-8,
invalid JSON (nesting too deep for the parser included), not an object, a string holding a lone surrogate (``"\\ud800"``
decodes to a str that no UTF-8 encoder accepts), a missing required field, or a field of the wrong type. A path that is
not a regular file (``/dev/zero``, a FIFO, a folder) is refused before it is opened. Blank lines are skipped.
``prompt`` must be a non-empty string; ``answer`` a string, or a JSON number (converted with ``str``, so ``42`` ->
``"42"``; booleans are refused).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

__all__ = [
    "MAX_LINE_BYTES",
    "JSONLFormatError",
    "check_regular_file",
    "load_jsonl",
    "load_jsonl_numbered",
    "parse_jsonl_lines",
    "save_jsonl",
]

MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any prompt a model takes, far below what exhausts memory


class JSONLFormatError(ValueError):
    """A malformed line; ``.source`` and ``.line`` (1-based) locate it."""

    def __init__(self, source: str, line: int, message: str):
        super().__init__(f"{source}, line {line}: {message}")
        self.source = source
        self.line = line


def _lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(where, character) of the first string (key or value, at any depth) holding a lone surrogate, else None.
    Iterative: the parser already accepted the nesting, a recursive walk could still overflow the stack."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                inner = f"{where}[{k!r}]" if where else f"field {k!r}"
                stack.extend([(f"{inner} (its name)", k), (inner, v)])
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where or "the value", value[exc.start]
    return None


def _check_record(obj: Any, source: str, line: int, required: Sequence[str]) -> dict[str, Any]:
    surrogate = _lone_surrogate(obj)
    if surrogate is not None:
        where, char = surrogate
        raise JSONLFormatError(
            source,
            line,
            f"{where} holds a lone surrogate \\u{ord(char):04x}, which is not Unicode text (a JSON "
            "escape of half a UTF-16 pair)",
        )
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


def _numbered_records(
    lines: Iterable[bytes | str], source: str, required: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
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
        except RecursionError:
            raise JSONLFormatError(source, number, "invalid JSON: nested too deeply for the parser") from None
        yield number, _check_record(obj, source, number, required)


def parse_jsonl_lines(
    lines: Iterable[bytes | str], *, source: str = "<jsonl>", required: Sequence[str] = ("prompt", "answer")
) -> list[dict[str, Any]]:
    """Parse JSONL lines (bytes or str) into records; see the module docstring for the checks."""
    return [record for _, record in _numbered_records(lines, source, required)]


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Refuse what is not a regular file (following links) before opening it: ``/dev/zero`` never ends and a FIFO
    blocks the open. Raises FileNotFoundError for a missing path, ValueError for the others."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
                 stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
        kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
        raise ValueError(f"{os.fspath(path)}: expected a regular JSONL file, got {kind}")


def _bounded_lines(f: IO[bytes], source: str, limit: int) -> Iterator[bytes]:
    """The lines of ``f``, each read no further than ``limit`` bytes: a longer one is refused by number."""
    number = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not (len(line) == limit + 1 and line.endswith(b"\n")):
            raise JSONLFormatError(
                source, number, f"line longer than {limit} bytes (MAX_LINE_BYTES = {limit // (1 << 20)} MiB)"
            )
        yield line


def load_jsonl_numbered(
    path: str | os.PathLike[str], *, required: Sequence[str] = ("prompt", "answer")
) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) of every non-blank line of a JSONL file: later checks (prompt lengths, held-out
    overlap) name the line too. Read as bytes so a bad UTF-8 line is reported with its number; lines of at most
    ``MAX_LINE_BYTES``; a path that is not a regular file is refused first (``check_regular_file``)."""
    check_regular_file(path)
    source = os.fspath(path)
    with open(path, "rb") as f:
        return list(_numbered_records(_bounded_lines(f, source, MAX_LINE_BYTES), source, required))


def load_jsonl(path: str | os.PathLike[str], *, required: Sequence[str] = ("prompt", "answer")) -> list[dict[str, Any]]:
    """Records of a JSONL file (the checks of ``load_jsonl_numbered``)."""
    return [record for _, record in load_jsonl_numbered(path, required=required)]


def save_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write records one JSON object per line (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
