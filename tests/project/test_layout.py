"""The package's layout rules, checked on the source: no private name crosses a package boundary, and no text of the
project names a tracker entry by its number instead of saying what it checks or does.

A private name (one leading underscore) is free to change inside its own package; a module of another package that
imports it, or reads it as ``module._name``, ties the two packages together behind their public names' back. Sibling
modules of one package (``trainer/checkpoint/folder.py`` and ``trainer/checkpoint/local.py``) may share them.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlvr_fast"


def _package_of(module: str) -> str:
    return module.rpartition(".")[0]


def _module_name(file: Path, root: Path) -> tuple[str, str]:
    """(the dotted module of ``file``, the package it belongs to)."""
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_crossings(root: Path, top: str = "rlvr_fast") -> list[str]:
    """Every private name of a ``top`` module used from a module of another package: ``from a.b import _x`` and
    ``import a.b as m; m._x`` (``file:line name``)."""
    found = []
    for file in sorted((root / top).rglob("*.py")):
        _, here = _module_name(file, root)
        tree = ast.parse(file.read_text(), filename=str(file))
        modules = {}  # local name -> the dotted module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(top):
                for alias in node.names:
                    source = node.module
                    if _is_private(alias.name) and here not in (source, _package_of(source)):
                        found.append(f"{file.relative_to(root)}:{node.lineno} {alias.name} from {source}")
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(top) and alias.asname:
                        modules[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name):
                source = modules.get(node.value.id)
                if source is not None and here not in (source, _package_of(source)):
                    found.append(f"{file.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr} ({source})")
    return found


TRACKER_REFERENCE = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)


def tracker_references(files: list[Path]) -> list[str]:
    """Lines that name a tracker entry by number (the word, a space or a hash, digits) instead of what they say."""
    found = []
    for file in files:
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if TRACKER_REFERENCE.search(line):
                found.append(f"{file}:{number}: {line.strip()[:100]}")
    return found


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [
        ROOT / name
        for name in listed
        if name.endswith((".py", ".md", ".toml", ".txt", ".cu", ".cpp", ".h"))
        and not name.startswith("benchmarks/results/")  # measured records, kept as they were written
        and (ROOT / name).is_file()
    ]


def test_no_private_name_crosses_a_package_boundary():
    assert private_crossings(ROOT) == []


def folders_without_init(package: Path) -> list[str]:
    """Folders of ``package`` holding Python modules but no ``__init__.py``: setuptools' ``find_packages`` (setup.py)
    leaves them out of the wheel, so they would import from a checkout and be missing from an install."""
    folders = {file.parent for file in package.rglob("*.py") if "__pycache__" not in file.parts}
    return sorted(str(f.relative_to(package.parent)) for f in folders if not (f / "__init__.py").is_file())


def test_every_folder_of_modules_is_a_package():
    assert folders_without_init(PACKAGE) == []


def test_no_text_names_a_tracker_entry():
    assert tracker_references(_tracked_text_files()) == []


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checks_find_what_they_look_for(tmp_path):
    """Each rule reports a planted breach, and leaves the allowed uses alone."""
    _write(tmp_path / "rlvr_fast/__init__.py", "")
    _write(tmp_path / "rlvr_fast/a/__init__.py", "")
    _write(tmp_path / "rlvr_fast/a/one.py", "_hidden = 1\n")
    _write(tmp_path / "rlvr_fast/a/two.py", "from rlvr_fast.a.one import _hidden\n")  # a sibling: allowed
    _write(tmp_path / "rlvr_fast/b/__init__.py", "")
    _write(tmp_path / "rlvr_fast/b/three.py", "from rlvr_fast.a.one import _hidden\n")
    _write(tmp_path / "rlvr_fast/b/four.py", "import rlvr_fast.a.one as one\nx = one._hidden\n")
    found = private_crossings(tmp_path)
    assert len(found) == 2, found
    assert found[0].startswith("rlvr_fast/b/four.py:2 one._hidden") and found[1].startswith("rlvr_fast/b/three.py:1")

    _write(tmp_path / "rlvr_fast/c/five.py", "")
    assert folders_without_init(tmp_path / "rlvr_fast") == ["rlvr_fast/c"]

    text = tmp_path / "note.md"
    planted = "see " + "Issue" + " #12 for why"  # spelled in parts: this file is one of those checked
    text.write_text(f"fine line\n{planted}\nissues and tissue 3 are words\n")
    assert tracker_references([text]) == [f"{text}:2: {planted}"]
