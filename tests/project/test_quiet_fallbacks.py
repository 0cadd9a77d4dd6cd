"""Fallbacks that used to be silent now say what happened, and helpers take only the arguments they read:

- a built but broken ``rlvr_fast._C`` is reported with its import error, not as "not built";
- without math-verify, symbolic answer checks warn once (naming the package) before counting as incorrect;
- a guarded reward function whose batch call fails while every per-sample retry succeeds logs that once;
- a benchmark baseline that fails (trial call or timing) is a row with its error, in the JSON report and the table.
"""

from __future__ import annotations

import ast
import functools
import importlib.abc
import importlib.util
import inspect
import json
import logging
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from rlvr_fast import backends
from rlvr_fast.benchmark import runner
from rlvr_fast.benchmark.cases import logprobs as logprobs_cases
from rlvr_fast.benchmark.cases.registry import Case, Floor
from rlvr_fast.benchmark.ceilings import Ceilings
from rlvr_fast.rewards import equivalence
from rlvr_fast.rewards.compose import guard

# ---------------------------------------------------------------------------------------------------------------------
# Dead code: every parameter of these helpers is read
# ---------------------------------------------------------------------------------------------------------------------


def _unread_parameters(fn) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return [n for n in names if n not in read and n != "self"]


def test_helpers_read_every_parameter():
    import rlvr_fast.kernels.logprobs as k

    from rlvr_fast.ops import fused_linear_grpo_loss as fused
    from rlvr_fast.optim import sparse_adamw

    for fn in (fused._make_plan, sparse_adamw._resolve_masks, k._default_splits):
        assert _unread_parameters(fn) == [], fn.__qualname__


def test_backends_has_no_uncalled_helpers():
    package = Path(backends.__file__).parent
    sources = "\n".join(p.read_text() for p in sorted(package.rglob("*.py")))
    tree = ast.parse(inspect.getsource(backends))
    for name in (n.name for n in tree.body if isinstance(n, ast.FunctionDef)):
        uses = len(re.findall(rf"\b{name}\b", sources)) - 1  # less its own def line
        assert uses > 0, f"backends.{name} is defined but nothing in the package uses it"


# ---------------------------------------------------------------------------------------------------------------------
# A broken CUDA extension says why
# ---------------------------------------------------------------------------------------------------------------------


class _BrokenExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``rlvr_fast._C`` and fails to load it as a .so built against another torch would."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "rlvr_fast._C" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")


@pytest.fixture
def fresh_extension_probe(monkeypatch):
    monkeypatch.delitem(sys.modules, "rlvr_fast._C", raising=False)
    backends._cuda_extension.cache_clear()
    yield
    backends._cuda_extension.cache_clear()


def test_broken_cuda_extension_reports_its_import_error(monkeypatch, fresh_extension_probe):
    monkeypatch.setattr(sys, "meta_path", [_BrokenExtension(), *sys.meta_path])
    assert not backends.has_cuda_extension()
    reason = backends.cuda_unavailable_reason(torch.device("cpu"), "group_advantage")
    assert "not built" not in reason
    assert "failed to import" in reason and "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev" in reason
    with pytest.raises(backends.BackendUnavailableError, match="undefined symbol"):
        backends.select_backend("cuda", torch.device("cpu"), op="group_advantage", cuda_op="group_advantage")


def test_missing_cuda_extension_still_reads_not_built(monkeypatch, fresh_extension_probe):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "rlvr_fast._C" else real_find_spec(name, *a),
    )
    reason = backends.cuda_unavailable_reason(torch.device("cpu"), "group_advantage")
    assert "the extension rlvr_fast._C is not built" in reason


# ---------------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def without_math_verify(monkeypatch):
    def reset():  # the verdict cache, and the once-per-process warning
        equivalence._equivalent_cached.cache_clear()
        getattr(equivalence, "_warn_no_math_verify", functools.cache(lambda: None)).cache_clear()

    monkeypatch.setattr(equivalence, "_math_verify", lambda: None)
    reset()
    yield
    reset()


def test_symbolic_check_without_math_verify_warns_once_by_name(without_math_verify):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not equivalence.is_equivalent("\\sqrt{4}", "2")
        assert not equivalence.is_equivalent("x+1", "1+x")
        assert equivalence.is_equivalent("0.5", "1/2")  # numeric grammar: math-verify is not needed, no warning
    missing = [w for w in caught if "math-verify is not installed" in str(w.message)]
    assert len(missing) == 1, [str(w.message) for w in caught]
    assert "rlvr_fast[rewards]" in str(missing[0].message)
    assert missing[0].filename == __file__  # points at the code that asked for the check


def test_numeric_checks_without_math_verify_do_not_warn(without_math_verify):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert equivalence.is_equivalent("3", "3.0")
        assert not equivalence.is_equivalent("3", "4")
    assert not [w for w in caught if "math-verify" in str(w.message)]


def test_batch_failure_with_passing_retries_is_logged_once(caplog):
    calls = []

    def batch_only_bug(completions, answers):
        calls.append(len(completions))
        if len(completions) > 1:
            raise KeyError("batched path reads a missing column")
        return [1.0] * len(completions)

    reward = guard(batch_only_bug)
    with caplog.at_level(logging.WARNING, logger="rlvr_fast.rewards"):
        assert reward(["a", "b", "c"], ["1", "2", "3"]) == [1.0, 1.0, 1.0]
        assert reward(["a", "b"], ["1", "2"]) == [1.0, 1.0]
    assert reward.errors == []
    records = [r for r in caplog.records if "failed on the whole batch" in r.getMessage()]
    assert len(records) == 1
    assert (
        "batch_only_bug" in records[0].getMessage() and "batched path reads a missing column" in records[0].getMessage()
    )
    assert calls == [3, 1, 1, 1, 2, 1, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks: a failing baseline is a row with its error
# ---------------------------------------------------------------------------------------------------------------------


def _raise(message):
    def fn(*args):
        raise RuntimeError(message)

    return fn


@pytest.fixture
def fake_runner(monkeypatch):
    def install(cases):
        monkeypatch.setattr(runner, "build_cases", lambda device, ops: cases)
        monkeypatch.setattr(runner, "measure_ceilings", lambda device: Ceilings(10.0, 1.0, "float32"))

    return install


def _case(impls, baseline="naive_torch", **extra):
    return Case(op="toy", label="4x4", impls=impls, floor=Floor(flops=1e3, bytes=1e3), baseline=baseline, **extra)


def test_baseline_raising_while_timed_is_a_row_with_its_error(fake_runner):
    fake_runner(
        [_case({"rlvr_fast": lambda: None, "naive_torch": lambda: None, "opponent": _raise("no kernel image")})]
    )
    report = runner.run_benchmarks("cpu")
    rows = {r["impl"]: r for r in json.loads(json.dumps(report))["results"]}
    assert list(rows) == ["rlvr_fast", "naive_torch", "opponent"]
    assert rows["opponent"]["error"] == "RuntimeError: no kernel image"
    assert rows["opponent"]["median_ms"] is None and rows["opponent"]["ratio_to_baseline"] is None
    assert rows["rlvr_fast"]["error"] is None and rows["rlvr_fast"]["ratio_to_baseline"] > 0
    table = runner.format_table(report)
    assert "opponent" in table and "FAILED: RuntimeError: no kernel image" in table


def test_failing_reference_baseline_keeps_the_other_rows(fake_runner):
    fake_runner([_case({"rlvr_fast": lambda: None, "naive_torch": _raise("out of memory")})])
    report = runner.run_benchmarks("cpu")
    rows = {r["impl"]: r for r in report["results"]}
    assert rows["naive_torch"]["error"] == "RuntimeError: out of memory"
    assert rows["rlvr_fast"]["median_ms"] > 0 and rows["rlvr_fast"]["ratio_to_baseline"] is None
    assert "FAILED: RuntimeError: out of memory" in runner.format_table(report)


def test_our_op_raising_still_stops_the_run(fake_runner):
    fake_runner([_case({"rlvr_fast": _raise("bug in ours"), "naive_torch": lambda: None})])
    with pytest.raises(RuntimeError, match="bug in ours"):
        runner.run_benchmarks("cpu")


def test_baseline_failing_its_trial_call_is_reported(monkeypatch, fake_runner):
    monkeypatch.setattr(logprobs_cases, "_has", lambda module: module == "cut_cross_entropy")
    monkeypatch.setattr(logprobs_cases, "_cce", _raise("cce kernel refused"))
    failed = {}
    # the CUDA-only baselines; without a GPU the trial call fails even earlier, which is just as much a failure
    impls = logprobs_cases.token_impls(torch.device("cuda"), torch.float32, failed)
    assert "cce" not in impls and failed["cce"]
    fake_runner([_case({"rlvr_fast": lambda: None, "naive_torch": lambda: None}, failed={"cce": failed["cce"]})])
    rows = {r["impl"]: r for r in runner.run_benchmarks("cpu")["results"]}
    assert rows["cce"]["error"] == failed["cce"] and rows["cce"]["median_ms"] is None
