"""Every module of the package imports, and no two ``rlvr_fast`` modules import each other, even lazily.

The import graph is read from the source with ``ast``: an edge A -> B for every ``import`` / ``from ... import`` of a
``rlvr_fast`` module anywhere in A (module level or inside a function: a lazy import only hides a cycle until the
function runs), except under ``if TYPE_CHECKING:``. ``from pkg import name`` points at the submodule ``pkg.name`` when
there is one, else at ``pkg`` (for a package: when its ``__init__`` binds ``name``; a compiled extension such as
``rlvr_fast._C`` is neither and is left out). Importing a submodule also runs its parents' ``__init__``; those implicit
edges are left out too, as import-cycle linters do, because Python has bound a package before its submodules run.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rlvr_fast

PACKAGE_DIRS = {
    "rlvr_fast": Path(rlvr_fast.__file__).parent,
    "rlvr_fast.kernels": Path(rlvr_fast.__file__).parent.parent / "kernels",  # installed as rlvr_fast.kernels
}
# modules that need an extra to import
OPTIONAL_IMPORTS = {
    "rlvr_fast.integrations.trl": "trl",
    "rlvr_fast.integrations.verl.plugin": "verl",
    "rlvr_fast.integrations.verl_plugin": "verl",  # the old path of verl.plugin, kept as an alias
}
# modules that refuse the Triton interpreter (they compile the real kernels): imported in a fresh process without it
COMPILER_ONLY = {"rlvr_fast.kernels.check.aot_compile"}


def _module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (kernels included)."""
    files: dict[str, Path] = {}
    for prefix, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if prefix == "rlvr_fast" and name.startswith("rlvr_fast.kernels"):
                continue  # a stray copy under rlvr_fast/ would shadow nothing: kernels/ is the source
            files[name] = path
    return files


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node of ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a package's ``__init__`` binds at module level (imports, definitions, assignments)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in files.items()}
    bound = {name: _bound_names(tree) for name, tree in trees.items()}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, tree in trees.items():
        is_package = files[name].name == "__init__.py"
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                source = _resolve(name, node, is_package)
                targets = []
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in files:
                        targets.append(sub)
                    elif source in files and (files[source].name != "__init__.py" or alias.name in bound[source]):
                        targets.append(source)
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles():
    files = _module_files()
    assert "rlvr_fast.ops.grpo_loss" in files and "rlvr_fast.kernels.grpo_loss" in files
    cycles = find_cycles(import_graph(files))
    assert cycles == [], f"import cycles among rlvr_fast modules: {cycles}"


def test_cycle_finder_finds_a_lazy_cycle(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found, a one-way chain is not."""
    (tmp_path / "a.py").write_text("from rlvr_fast.x.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from rlvr_fast.x.a import g\n")
    (tmp_path / "c.py").write_text("import rlvr_fast.x.a\nif TYPE_CHECKING:\n    import rlvr_fast.x.c2\n")
    (tmp_path / "c2.py").write_text("from rlvr_fast.x import c\n")
    files = {f"rlvr_fast.x.{p.stem}": p for p in tmp_path.glob("*.py")}
    assert find_cycles(import_graph(files)) == [["rlvr_fast.x.a", "rlvr_fast.x.b"]]


@pytest.mark.parametrize("module", sorted(m for m in _module_files() if not m.endswith("__main__")))
def test_every_module_imports(module):
    """(``__main__`` modules run the CLI when imported: the cycle test reads them, this one does not run them.)"""
    if module in OPTIONAL_IMPORTS:
        pytest.importorskip(OPTIONAL_IMPORTS[module])
    if module in COMPILER_ONLY:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"import {module} failed without the interpreter:\n{done.stderr[-2000:]}"
        return
    importlib.import_module(module)
