"""The docs point at things that exist. Over README.md, docs/*.md and the docstrings of examples/*.py:

- every relative markdown link names a file of the repository, and its ``#anchor`` a heading of that file;
- every dotted ``rlvr_fast.x.y`` name in backticks is a module of the package (or a name defined at a module's top);
- every repository path in backticks (``rlvr_fast/...``, ``trainer/...`` inside the package, ``benchmarks/...``,
  ``tests/...``, ``docs/...``, ``examples/...``, ``kernels/...``, ``csrc/...``) exists (a ``*`` matches as a glob);
- every documented command, ``rlvr-fast <command> --flag``, ``python -m rlvr_fast <command> --flag`` (torchrun too)
  and ``python benchmarks/<script>.py --flag`` / ``python examples/<script>.py --flag``: the command or script
  exists and its parser accepts every flag; a span that is a bare flag (``--resume true``) is accepted by one of
  those parsers.

Also: every pointer to ``docs/design.md`` names a section that exists, and no tracked file points at the design
inputs outside the repository (the sibling folder ``shared``), which a user who clones or installs it does not have.

Each checker takes a ``Doc`` (its path and text) and returns the problems it found, one line each, so that the
negative tests below can feed it a made-up text. Nothing here runs a script or loads a model: the ``rlvr-fast``
parsers are built by ``rlvr_fast.cli.build_parser``, and a script's flags are read from its ``add_argument`` calls.
"""

from __future__ import annotations

import ast
import glob
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
# Spelled in parts so that this file does not match itself.
OUTSIDE = "/".join(["..", "shared"])
TEXT_SUFFIXES = {".py", ".md", ".cu", ".cuh", ".h", ".cpp", ".sh", ".toml", ".txt", ".yaml", ".yml"}

# Modules that exist only after a build (the CUDA C++ extension, from csrc/ with nvcc).
BUILT_MODULES = {"rlvr_fast._C"}
# Install-time mapping of a folder outside rlvr_fast/ to a subpackage (setup.py's package_dir).
PACKAGE_DIRS = {"rlvr_fast.kernels": "kernels"}
# Folders of the repository whose paths the docs name; a path starting with a subpackage name of rlvr_fast
# (``trainer/loop.py``) is read inside the package.
REPO_ROOTS = ("rlvr_fast", "benchmarks", "tests", "docs", "examples", "kernels", "csrc")
# argparse's own flag on every parser.
ARGPARSE_FLAGS = {"-h", "--help"}
# Folders of scripts whose flags the docs name (``python <folder>/<script>.py --flag``).
SCRIPT_FOLDERS = ("benchmarks", "examples", "kernels/check")
# Flags of other tools that the docs name alone, in backticks (the bare-flag check knows only our parsers).
OTHER_TOOLS_FLAGS = {
    "--no-deps": "pip",
    "--use_fast_math": "nvcc",
    "--advantage_estimator": "OpenRLHF",
}
# A path after one of these flags is one the command writes, not one that must exist.
OUTPUT_FLAGS = ("--output-dir", "--output_dir", "--json", "--out")


@dataclass(frozen=True)
class Doc:
    path: Path  # where the text lives (relative links resolve against its folder)
    text: str

    def where(self, line_no: int) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{line_no}"


# ---- reading the docs ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def prose_and_code(doc: Doc) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line number, line) of the prose and of the fenced code blocks, apart."""
    prose, code, fenced = [], [], False
    for n, line in enumerate(doc.text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append((n, line))
    return prose, code


def inline_spans(doc: Doc) -> list[tuple[int, str]]:
    """The text of every inline code span (single or double backticks) in the prose."""
    prose, _ = prose_and_code(doc)
    return [(n, m.group(2).strip()) for n, line in prose for m in _INLINE_CODE.finditer(line)]


def command_lines(doc: Doc) -> list[tuple[int, str]]:
    """Lines of code blocks, continuation lines (trailing backslash) joined, comments dropped."""
    _, code = prose_and_code(doc)
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in code:
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if pending is not None:
            n, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.endswith("\\"):
            pending = (n, line[:-1].rstrip())
            continue
        if line.strip():
            out.append((n, line.strip()))
    if pending is not None:
        out.append(pending)
    return out


def docs() -> list[Doc]:
    """README.md, docs/*.md, and each examples/*.py docstring (its indented lines read as a code block)."""
    found = [Doc(p, p.read_text()) for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    for path in sorted((ROOT / "examples").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines = docstring.splitlines()
        # an indented line of a docstring is a command: fence it, so the readers above take it as code
        fenced = [f"```\n{line}\n```" if line.startswith("    ") else line for line in lines]
        found.append(Doc(path, "\n".join(fenced)))
    return found


# ---- links -----------------------------------------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a markdown text: lower case, markup and punctuation dropped (letters,
    digits, ``_`` and ``-`` kept), spaces to hyphens; a repeated heading gets ``-1``, ``-2``, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_and_code(Doc(Path("-"), text))[0]:
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if not m:
            continue
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problems(doc: Doc) -> list[str]:
    problems = []
    for n, line in prose_and_code(doc)[0]:
        for m in _LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            path = (doc.path.parent / file_part).resolve()
            if file_part and not path.exists():
                problems.append(f"{doc.where(n)}: link to a missing file: {target}")
                continue
            text = path.read_text() if file_part else doc.text  # "#anchor" alone: a heading of this doc
            if anchor and (path.suffix == ".md" or not file_part) and anchor not in heading_anchors(text):
                problems.append(f"{doc.where(n)}: link to a missing heading: {target}")
    return problems


# ---- module names ----------------------------------------------------------------------------------------------------

_DOTTED = re.compile(r"(?<![\w./])rlvr_fast(?:\.[A-Za-z_]\w*)+")


@cache
def _top_level_names(path: Path) -> frozenset[str] | None:
    """Names a module defines or imports at its top (None: it has a module ``__getattr__``, so any name may exist)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return None if "__getattr__" in names else frozenset(names)


def module_file(dotted: str, root: Path = ROOT) -> Path | None:
    """The file of module ``dotted`` in the repository (a package's ``__init__.py``), or None."""
    for package, folder in PACKAGE_DIRS.items():
        if dotted == package or dotted.startswith(package + "."):
            dotted = folder + dotted[len(package) :]
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def dotted_name_problems(doc: Doc, root: Path = ROOT) -> list[str]:
    """Each ``rlvr_fast.a.b.C``: its longest module prefix exists and defines the next name, if any."""
    problems = []
    for n, span in inline_spans(doc) + command_lines(doc):
        for m in _DOTTED.finditer(span):
            dotted = m.group(0)
            if any(dotted == b or dotted.startswith(b + ".") for b in BUILT_MODULES):
                continue
            parts = dotted.split(".")
            cut = next((i for i in range(len(parts), 0, -1) if module_file(".".join(parts[:i]), root)), 0)
            if cut == len(parts):
                continue
            if cut == 0:
                problems.append(f"{doc.where(n)}: no module {dotted}")
                continue
            names = _top_level_names(module_file(".".join(parts[:cut]), root))
            if names is not None and parts[cut] not in names:
                problems.append(f"{doc.where(n)}: {'.'.join(parts[:cut])} has no module or name {parts[cut]!r}")
    return problems


# ---- repository paths ------------------------------------------------------------------------------------------------

_SUBPACKAGES = tuple(p.name for p in (ROOT / "rlvr_fast").iterdir() if p.is_dir() and not p.name.startswith("_"))
_PATH = re.compile(r"(?<![\w./-])(?:" + "|".join(REPO_ROOTS + _SUBPACKAGES) + r")/[\w.*/-]*")


def path_problems(doc: Doc, root: Path = ROOT) -> list[str]:
    problems = []
    for n, span in inline_spans(doc) + command_lines(doc):
        for m in _PATH.finditer(span):
            path = m.group(0).rstrip(".")
            if span[: m.start()].rstrip(" =").endswith(OUTPUT_FLAGS):
                continue  # written by the command
            first = path.split("/")[0]
            candidates = [path] if first in REPO_ROOTS else [f"rlvr_fast/{path}"]
            if not any(glob.glob(str(root / c)) for c in candidates):
                problems.append(f"{doc.where(n)}: no such file or folder: {path}")
    return problems


# ---- commands and flags ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsers:
    commands: dict[str, frozenset[str]]  # rlvr-fast <command> -> its option strings
    scripts: dict[str, frozenset[str]]  # benchmarks/x.py, examples/y.py -> the flags its add_argument calls name

    def every_flag(self) -> frozenset[str]:
        return frozenset().union(*self.commands.values(), *self.scripts.values())


def script_flags(path: Path) -> frozenset[str]:
    """The flags a script names, read from its source (the script is not run: the benchmark scripts import torch and
    transformers at the top): every string constant that is a whole flag (``"--steps"`` in ``add_argument``, a renamed
    flag's old spelling in a table of aliases), plus argparse's ``--help``."""
    flags = set(ARGPARSE_FLAGS)
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"--?[A-Za-z][\w-]*", node.value)
        ):
            flags.add(node.value)
    return frozenset(flags)


@cache
def repository_parsers() -> Parsers:
    from rlvr_fast.cli import build_parser

    commands = {name: frozenset(p._option_string_actions) for name, p in build_parser().commands.items()}
    scripts = {
        str(p.relative_to(ROOT)): script_flags(p)
        for folder in SCRIPT_FOLDERS
        for p in sorted((ROOT / folder).glob("*.py"))
    }
    return Parsers(commands, scripts)


def _tokens(segment: str) -> list[str]:
    try:
        tokens = shlex.split(segment)
    except ValueError:  # an unclosed quote in prose: plain words are enough to find flags
        tokens = segment.split()
    return [t.strip("[]()") for t in tokens]


def _flag_name(token: str) -> str | None:
    m = re.match(r"^(--?[A-Za-z][\w-]*)", token)
    return m.group(1) if m and token.startswith("--") else None


def command_problems(doc: Doc, parsers: Parsers, root: Path = ROOT) -> list[str]:
    problems = []
    every_flag = parsers.every_flag()
    spans = [(n, s, True) for n, s in inline_spans(doc)] + [(n, s, False) for n, s in command_lines(doc)]
    for n, text, inline in spans:
        for segment in re.split(r"&&|\|\||;|\s\|\s", text):
            tokens = _tokens(segment)
            if not tokens:
                continue
            if inline and _flag_name(tokens[0]):  # a bare flag: one of the parsers must take it
                flag = _flag_name(tokens[0])
                if flag not in every_flag and flag not in OTHER_TOOLS_FLAGS:
                    problems.append(f"{doc.where(n)}: {flag} is no flag of rlvr-fast or of a script: {text}")
                continue
            accepted, what, rest = None, None, []
            for i, tok in enumerate(tokens):
                if Path(tok).name == "rlvr-fast" or (tok == "-m" and tokens[i + 1 : i + 2] == ["rlvr_fast"]):
                    j = i + 1 if tok != "-m" else i + 2
                    sub = tokens[j] if j < len(tokens) else None
                    if sub is None or sub.startswith(("-", "<")) or sub.endswith(":") or sub in {"...", "|"}:
                        break  # `rlvr-fast --version`, `rlvr-fast <command>`, a message `rlvr-fast train: error`
                    if sub not in parsers.commands:
                        problems.append(f"{doc.where(n)}: rlvr-fast has no command {sub!r}: {text}")
                        break
                    accepted, what, rest = parsers.commands[sub], f"rlvr-fast {sub}", tokens[j + 1 :]
                    break
                if (
                    re.fullmatch(r"(" + "|".join(SCRIPT_FOLDERS) + r")/\w+\.py", tok)
                    and i > 0
                    and "python" in tokens[i - 1]
                ):
                    if not (root / tok).is_file():
                        problems.append(f"{doc.where(n)}: no script {tok}: {text}")
                        break
                    accepted, what, rest = parsers.scripts.get(tok) or script_flags(root / tok), tok, tokens[i + 1 :]
                    break
            if accepted is None:
                continue
            for tok in rest:
                flag = _flag_name(tok)
                if flag and flag not in accepted:
                    problems.append(f"{doc.where(n)}: {what} has no flag {flag}: {text}")
    return problems


# ---- the repository's docs -------------------------------------------------------------------------------------------


def _report(problems: list[str], what: str) -> None:
    assert not problems, f"{len(problems)} {what}:\n" + "\n".join(problems)


def test_every_docs_link_names_a_file_and_heading():
    _report([p for d in docs() for p in link_problems(d)], "links to nothing")


def test_every_dotted_rlvr_fast_name_exists():
    _report([p for d in docs() for p in dotted_name_problems(d)], "dotted names of nothing")


def test_every_repository_path_exists():
    _report([p for d in docs() for p in path_problems(d)], "paths of nothing")


def test_every_documented_command_and_flag_is_accepted():
    parsers = repository_parsers()
    assert {"train", "eval", "study", "bench"} <= set(parsers.commands), sorted(parsers.commands)
    assert "--lr" in parsers.commands["train"] and "--output-dir" in parsers.commands["train"]
    _report([p for d in docs() for p in command_problems(d, parsers)], "commands or flags that do not exist")


# ---- each check can fail: a made-up doc with one fault of each kind --------------------------------------------------

FAKE = """# Title

## A heading, with `code` (and §1. marks)

Good: [ok](README.md), [ok](docs/design.md#trade-offs), [here](#a-heading-with-code-and-1-marks),
`rlvr_fast.trainer.loop`, `rlvr_fast.trainer.loop.Trainer`, `rlvr_fast.kernels`, `rlvr_fast._C`,
`rlvr_fast/trainer/step.py`, `trainer/update/loss.py`, `benchmarks/results/*.json`,
`rlvr-fast train --lr 1e-5 --output-dir runs/new`, `--no-deps`, `rlvr-fast train: error: ...`,
`rlvr-fast bench [--device cpu|cuda]`, `--resume true`,
`python benchmarks/bench_distributed.py --prefix-sharing on`.

Bad: [gone](docs/no_such_page.md), [gone](docs/design.md#no-such-heading), [gone](#no-such-heading),
`rlvr_fast.no_such_module`, `rlvr_fast.trainer.loop.NoSuchName`,
`rlvr_fast/trainer/no_such.py`, `trainer/no_such/`, `benchmarks/no_such_*.json`,
`rlvr-fast train --no-such-flag 1`, `rlvr-fast nosuch --lr 1`, `--no-such-bare-flag`,
`python benchmarks/no_such_script.py`.

```bash
python benchmarks/bench_distributed.py --steps 2 \\
    --no-such-script-flag on   # a comment --not-a-flag
torchrun --standalone --nproc_per_node=2 -m rlvr_fast train --no-such-torchrun-flag 3
```
"""


@pytest.fixture(scope="module")
def fake() -> Doc:
    return Doc(ROOT / "fake.md", FAKE)


def _names(problems: list[str], needles: list[str]) -> None:
    for needle in needles:
        assert any(needle in p for p in problems), f"{needle!r} not reported in:\n" + "\n".join(problems)


def test_links_to_a_missing_file_or_heading_are_reported(fake):
    problems = link_problems(fake)
    _names(problems, ["docs/no_such_page.md", "docs/design.md#no-such-heading", ": #no-such-heading"])
    assert len(problems) == 3, problems  # the good links pass


def test_missing_modules_and_names_are_reported(fake):
    problems = dotted_name_problems(fake)
    _names(
        problems,
        [
            "rlvr_fast has no module or name 'no_such_module'",
            "rlvr_fast.trainer.loop has no module or name 'NoSuchName'",
        ],
    )
    assert len(problems) == 2, problems


def test_missing_paths_are_reported(fake):
    problems = path_problems(fake)
    _names(
        problems,
        [
            "rlvr_fast/trainer/no_such.py",
            "trainer/no_such/",
            "benchmarks/no_such_*.json",
            "benchmarks/no_such_script.py",
        ],
    )
    assert len(problems) == 4, problems


def test_unknown_commands_scripts_and_flags_are_reported(fake):
    problems = command_problems(fake, repository_parsers())
    _names(
        problems,
        [
            "rlvr-fast train has no flag --no-such-flag",
            "rlvr-fast has no command 'nosuch'",
            "--no-such-bare-flag is no flag",
            "no script benchmarks/no_such_script.py",
            "benchmarks/bench_distributed.py has no flag --no-such-script-flag",
            "rlvr-fast train has no flag --no-such-torchrun-flag",
        ],
    )
    assert len(problems) == 6, problems  # the good commands, the comment and torchrun's own flags pass


def test_heading_anchors_follow_github():
    text = "# The trainer: `rlvr-fast train`\n## Quick start (Python 3.11, pip)\n## Same\n## Same\n```\n# not one\n```"
    assert heading_anchors(text) == {"the-trainer-rlvr-fast-train", "quick-start-python-311-pip", "same", "same-1"}


# ---- pointers into docs/design.md and outside the repository ---------------------------------------------------------


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
