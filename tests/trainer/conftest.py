"""Fixtures of the trainer tests that refuse or stop a run before its model loads (tests/trainer/test_output_dir.py,
tests/trainer/test_run_lock.py)."""

import pytest


@pytest.fixture
def no_model_load(monkeypatch):
    import rlvr_fast.trainer.loop as loop

    def refuse(cfg):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(loop, "load_model", refuse)


@pytest.fixture
def local_model(tmp_path):
    """A folder that passes the model-source check (the loader itself is patched to fail)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)
