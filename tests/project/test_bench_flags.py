"""benchmarks/bench_distributed.py's command line: ``--prefix-sharing`` (the trainer's name for whether the update uses
the shared prefix) and its former spelling ``--shared-update``, still accepted with one warning naming the new one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"


@pytest.fixture(scope="module")
def parser():
    """The script's parser, built without running anything (the script is no package module: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("bench_distributed_flags", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("value", ["on", "off"])
def test_prefix_sharing_flag_parses_silently(parser, capsys, value):
    args = parser.parse_args(["--prefix-sharing", value])
    assert args.prefix_sharing == value
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["on", "off"])
def test_former_shared_update_flag_still_parses_and_warns_once(parser, capsys, value):
    args = parser.parse_args(["--shared-update", value])
    assert args.prefix_sharing == value and not hasattr(args, "shared_update")
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and len(err.splitlines()) == 1, err
    assert "--shared-update is renamed --prefix-sharing" in err and f"use --prefix-sharing {value}" in err


def test_prefix_sharing_default_and_choices(parser, capsys):
    assert parser.parse_args([]).prefix_sharing == "on"
    assert capsys.readouterr().err == ""
    for flag in ("--prefix-sharing", "--shared-update"):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, "auto"])
        assert "invalid choice: 'auto'" in capsys.readouterr().err
