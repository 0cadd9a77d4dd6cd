"""The design lives in the repository: every pointer to ``docs/design.md`` names a section that exists, and no tracked
file points at the design inputs outside the repository (the sibling folder ``shared``), which a user who clones or
installs it does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
# Spelled in parts so that this file does not match itself.
OUTSIDE = "/".join(["..", "shared"])
TEXT_SUFFIXES = {".py", ".md", ".cu", ".cuh", ".h", ".cpp", ".sh", ".toml", ".txt", ".yaml", ".yml"}


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the pointer check reads the tracked files")
    return [ROOT / p for p in out.splitlines() if Path(p).suffix in TEXT_SUFFIXES and (ROOT / p).is_file()]


def _sections() -> tuple[set[str], set[str]]:
    headings = [m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", DESIGN.read_text(), re.M)]
    numbered = {m.group(1) for h in headings if (m := re.match(r"§(\d+)\.", h))}
    return numbered, set(headings)


def test_every_design_pointer_names_an_existing_section():
    numbered, headings = _sections()
    assert numbered == {str(i) for i in range(1, 9)}, (
        f"docs/design.md must have sections §1-§8, found {sorted(numbered)}"
    )
    bad = []
    for path in _tracked_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in re.finditer(r"design\.md,? (?:§§?([\d, -]+)|\(?\"([^\"]+)\")", line):
                if m.group(1):
                    nums = re.findall(r"\d+", m.group(1))
                    bad += [f"{path.relative_to(ROOT)}:{n}: §{x}" for x in nums if x not in numbered]
                elif m.group(2) not in headings:
                    bad.append(f'{path.relative_to(ROOT)}:{n}: "{m.group(2)}"')
    assert not bad, "pointers to sections docs/design.md does not have:\n" + "\n".join(bad)


def test_no_tracked_file_points_outside_the_repository():
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _tracked_text_files()
        if p.relative_to(ROOT).parts[0] != ".ci"
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE in line
    ]
    assert not hits, f"files point at {OUTSIDE}: {hits}"
