"""Fixtures of the trainer tests: refusing or stopping a run before its model loads (tests/trainer/test_output_dir.py,
tests/trainer/test_run_lock.py), and one torch thread for a module of tiny-model study runs."""

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


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for a module of tiny-model runs (the study tests: ``pytestmark = usefixtures(...)``): tiny
    matmuls run faster on one thread, and a busy machine cannot slow them by oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
