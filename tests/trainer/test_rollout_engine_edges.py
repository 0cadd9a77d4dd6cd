"""Edges of ``rollout_engine='vllm'`` that need no vLLM: settings the engine cannot honour are refused by
``checks/preflight.check_rollout_engine`` before anything loads, and a LoRA-adapted policy's weights reach the engine
as merged plain weights (``vllm_engine._named_tensors``, compared with PEFT's own merge). The engine itself:
tests/integrations/test_vllm_engine_edges.py, in vLLM's virtualenv."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.checks.preflight import check_rollout_engine
from rlvr_fast.trainer.evaluation.command import run_eval
from rlvr_fast.trainer.rollout.vllm_engine import VLLM_MIN_TEMPERATURE, _named_tensors
from rlvr_fast.trainer.schema import ConfigFieldError


def _importable_vllm(monkeypatch) -> None:
    """A stand-in ``vllm`` of a supported version: the check then reaches the settings, not the missing package."""
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.33.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)


@pytest.mark.parametrize("field", ["temperature", "eval_temperature"])
def test_a_temperature_vllm_would_raise_is_refused(tmp_path, monkeypatch, field):
    # vLLM silently samples any temperature in (0, 0.01) at 0.01; RLVRConfig accepts down to 1e-4
    _importable_vllm(monkeypatch)
    cfg = tiny_config(tmp_path, rollout_engine="vllm", **{field: 0.005})
    with pytest.raises(ConfigFieldError, match=r"expected at least 0\.01 .*got 0\.005") as info:
        check_rollout_engine(cfg)
    assert info.value.field == field and f"RLVRConfig.{field}" in str(info.value)
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="vllm", **{field: VLLM_MIN_TEMPERATURE}))
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="native", **{field: 0.005}))  # the native one samples it


def test_a_low_temperature_is_refused_even_without_vllm(tmp_path, monkeypatch):
    # the setting is judged first: the user learns of it before installing vLLM
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigFieldError) as info:
        check_rollout_engine(tiny_config(tmp_path, rollout_engine="vllm", temperature=1e-3))
    assert info.value.field == "temperature"


def test_qlora_with_vllm_is_refused_by_name(tmp_path, monkeypatch):
    _importable_vllm(monkeypatch)
    cfg = tiny_config(tmp_path, rollout_engine="vllm", adapter="qlora", lora_rank=4, lora_alpha=8)
    with pytest.raises(ConfigFieldError, match=r"expected adapter='lora' or 'none'.*got 'qlora'") as info:
        check_rollout_engine(cfg)
    assert info.value.field == "adapter"
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="vllm", adapter="lora", lora_rank=4, lora_alpha=8))


def test_a_lora_policy_is_pushed_as_peft_merges_it(tmp_path):
    """The names and values the engine receives from an adapted policy (B trained away from 0) are those of PEFT's
    merge_and_unload of the same model: plain layer names, W + scale * B @ A; no lora_A/lora_B, no base_layer."""
    pytest.importorskip("peft")
    from rlvr_fast.trainer.adapters import apply_adapter

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = tiny_config(tmp_path, adapter="lora", lora_rank=4, lora_alpha=8)
    adapter = apply_adapter(cfg, model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pushed = dict(_named_tensors(model))
    merged = copy.deepcopy(adapter.peft_model).merge_and_unload()
    expected = dict(merged.named_parameters())
    assert list(pushed) == list(before) == list(expected)
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor.float(), expected[name].detach().float(), rtol=1e-6, atol=1e-6)
    changed = {n for n in pushed if not torch.equal(pushed[n], before[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)  # the deltas are in: the check could fail
    # the model itself is not touched by the push (no merge in place)
    assert any("lora_B" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("correction", ["token_truncate", "sequence_truncate"])
def test_a_correction_with_top_p_below_1_is_refused(tmp_path, monkeypatch, correction):
    # vLLM's log-probs are of the renormalised nucleus, the trainer's of the whole vocabulary: the ratio would carry
    # the nucleus's mass at every token (tests/integrations/test_vllm_engine_edges.py measures the gap)
    _importable_vllm(monkeypatch)
    cfg = tiny_config(tmp_path, rollout_engine="vllm", rollout_correction=correction, top_p=0.9)
    with pytest.raises(ConfigFieldError, match=r"expected top_p=1\.0 .*got 0\.9") as info:
        check_rollout_engine(cfg)
    assert info.value.field == "top_p" and "RLVRConfig.top_p" in str(info.value)
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="vllm", top_p=0.9))  # sampling with top_p: fine
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="vllm", rollout_correction=correction))


@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_rlvr_fast_eval_says_which_engine_samples(tmp_path, engine):
    """``rlvr-fast eval`` samples with the native engine whatever ``rollout_engine`` says, and says so when the
    setting names another engine (no silent swap)."""
    text = run_eval(tiny_config(tmp_path, rollout_engine=engine), loaded=tiny_loaded())
    said = "sampled with the native engine (rollout_engine='vllm' is for training)"
    assert (text.splitlines()[0] == said) == (engine == "vllm")
    assert "pass@1:" in text
