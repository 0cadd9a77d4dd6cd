"""Mixed precision where the CPU computes bf16 natively (trainer/precision.py): ``RLVRConfig.dtype='autocast_bf16'``
keeps float32 weights and optimizer state and runs every forward under ``torch.autocast(dtype=bfloat16)``; ``auto``
chooses it on a CPU with AMX or AVX512-BF16. Tiny models, no download."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers.runs import TOKEN_BIAS, saved_tiny_model, tiny_config

import rlvr_fast.trainer.precision as precision
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel, load_model, resolve_dtype
from rlvr_fast.trainer.precision import precision_of_loaded, resolve_precision
from rlvr_fast.trainer.schema import ConfigFieldError

CPU = torch.device("cpu")


def _loaded(seed: int = 0) -> LoadedModel:
    tokenizer = char_tokenizer()
    return LoadedModel(tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, seed=seed), tokenizer, CPU, torch.float32)


def _native_bf16(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags))


# ---- resolution ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected", "reason"),
    [
        ({"amx_bf16", "avx512_bf16"}, "autocast_bf16", "natively: AMX, AVX512-BF16"),
        ({"avx512_bf16"}, "autocast_bf16", "natively: AVX512-BF16"),
        ({"avx2", "avx512_f"}, "float32", "no native bf16"),
    ],
)
def test_auto_follows_the_cpus_bf16_support(monkeypatch, flags, expected, reason):
    _native_bf16(monkeypatch, flags)
    p = resolve_precision("auto", CPU)
    assert p.name == expected and reason in p.reason
    assert p.weights == torch.float32  # float32 master weights either way
    assert p.compute == (torch.bfloat16 if expected == "autocast_bf16" else torch.float32)
    assert resolve_dtype("auto", CPU) == torch.float32


def test_auto_on_cuda_keeps_bfloat16_weights(monkeypatch):
    _native_bf16(monkeypatch, {"amx_bf16"})  # the host CPU does not matter on a GPU
    p = resolve_precision("auto", torch.device("cuda"))
    assert (p.name, p.weights, p.autocast_dtype) == ("bfloat16", torch.bfloat16, None)


def test_explicit_autocast_without_native_bf16_warns_and_runs(monkeypatch):
    """Allowed with a warning (a choice): the results are right, only slower than float32 there."""
    _native_bf16(monkeypatch, set())
    with pytest.warns(UserWarning, match="without native bf16"):
        p = resolve_precision("autocast_bf16", CPU)
    assert p.autocast_dtype == torch.bfloat16 and "emulated" in p.reason


def test_bad_choices_are_config_field_errors():
    with pytest.raises(ConfigFieldError, match="autocast_bf16") as info:
        RLVRConfig(dtype="float16").validate()
    assert info.value.field == "dtype"
    with pytest.raises(ConfigFieldError, match=r"needs float32 weights .*, got .*bfloat16") as info:
        precision_of_loaded("autocast_bf16", CPU, torch.bfloat16)
    assert info.value.field == "dtype"


def test_load_model_resolves_auto_to_autocast_over_float32_weights(tmp_path, monkeypatch):
    _native_bf16(monkeypatch, {"amx_bf16"})
    loaded = load_model(RLVRConfig(model=saved_tiny_model(tmp_path), device="cpu"))
    assert loaded.precision.name == "autocast_bf16" and loaded.dtype == torch.float32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_a_model_loaded_by_the_caller_keeps_its_weights_dtype_under_auto(monkeypatch):
    """auto adds no autocast to a model the caller loaded (its loader chose); naming autocast_bf16 does."""
    _native_bf16(monkeypatch, {"amx_bf16"})
    assert precision_of_loaded("auto", CPU, torch.float32).autocast_dtype is None
    assert precision_of_loaded("autocast_bf16", CPU, torch.float32).autocast_dtype == torch.bfloat16


# ---- one step against the float32 step --------------------------------------------------------------------------


def _trainer(tmp_path, name: str, dtype: str, **overrides) -> Trainer:
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), dtype=dtype, **overrides)
    return Trainer(cfg, loaded=_loaded())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_autocast_step_is_within_bf16_tolerance_of_the_float32_step(tmp_path):
    """The same rollout (the float32 trainer's) updated by both: two AdamW steps (num_iterations=2, so the second
    step's loss has a ratio != 1 and depends on the precision) with a KL term (beta > 0); the last step's loss and
    gradient are compared.

    Tolerances: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.2%); each matmul rounds its inputs once and
    accumulates in float32, so a few roundings along the path give ~1%: loss 2% relative, gradient norm 1%, the
    gradient 2% in norm (measured 0.7%, 0.02%, 0.3%). The weights after the steps differ from the float32 step's by
    less than bf16 would lose storing them (2^-8 of their norm; measured 2^-10.4). The step is not degenerate (its
    gradient norm is not near 0, where bf16's error would be the whole gradient)."""
    common = dict(num_iterations=2, beta=0.1, lr=1e-4, grad_clip=None)
    fp32, bf16 = _trainer(tmp_path, "fp32", "float32", **common), _trainer(tmp_path, "bf16", "autocast_bf16", **common)
    assert bf16.precision.autocast_dtype == torch.bfloat16 and fp32.precision.autocast_dtype is None
    batch = fp32.prepare_step(fp32.problems_at(0), 0).batch
    assert len(batch.advantages) > 0
    out32 = fp32.update(copy.deepcopy(batch))
    out16 = bf16.update(copy.deepcopy(batch))

    assert out32["grad_norm"] > 0.1
    assert out16["loss"] == pytest.approx(out32["loss"], rel=2e-2, abs=1e-5)
    assert out16["grad_norm"] == pytest.approx(out32["grad_norm"], rel=1e-2)
    grads32 = torch.cat([p.grad.flatten() for p in fp32.model.parameters() if p.grad is not None])
    grads16 = torch.cat([p.grad.flatten() for p in bf16.model.parameters() if p.grad is not None])
    assert 0 < _rel(grads16, grads32) < 2e-2  # > 0: autocast did change the arithmetic
    for (name, w32), (_, w16) in zip(fp32.model.named_parameters(), bf16.model.named_parameters()):
        assert w16.dtype == torch.float32, name
        assert _rel(w16.detach(), w32.detach()) < 2**-8, name


@pytest.mark.parametrize("prefix_sharing", ["on", "off"])  # the shared-prefix sampler, then HF generate
def test_every_forward_runs_in_bf16_and_sampling_reads_float32(tmp_path, prefix_sharing, monkeypatch, capsys):
    import rlvr_fast.trainer.rollout.engines as engines
    import rlvr_fast.trainer.rollout.shared_prefix_sampler as sampler

    scores_dtypes = set()
    draw = sampler.draw_tokens
    monkeypatch.setattr(sampler, "draw_tokens", lambda s, u: (scores_dtypes.add(s.dtype), draw(s, u))[1])
    check = engines.finite_scores_check

    def recording_check():
        processors = check()
        inner = processors[0].__call__
        processors[0].__class__.__call__ = lambda self, ids, s: (scores_dtypes.add(s.dtype), inner(ids, s))[1]
        return processors

    monkeypatch.setattr(engines, "finite_scores_check", recording_check)
    trainer = _trainer(
        tmp_path, "run", "autocast_bf16", steps=1, num_iterations=2, beta=0.1, prefix_sharing=prefix_sharing
    )
    down_proj = trainer.model.model.layers[0].mlp.down_proj
    dtypes: list[torch.dtype] = []
    down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    ref_dtypes: list[torch.dtype] = []
    trainer.ref_model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: ref_dtypes.append(o.dtype))
    trainer.train()

    # evaluation before and after, the rollout, the old-policy pass, the update's forwards: all bf16
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert ref_dtypes and set(ref_dtypes) == {torch.bfloat16}
    assert scores_dtypes == {torch.float32}  # softmax / top-p on float32 logits
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert state and {v.dtype for v in state} == {torch.float32}
    err = capsys.readouterr().err
    assert err.count("precision: bf16 autocast over float32 weights (set by RLVRConfig.dtype") == 1
    with open(os.path.join(trainer.cfg.output_dir, "report.md")) as fh:
        report = fh.read()
    assert '"precision": "autocast_bf16"' in report and '"compute_dtype": "bfloat16"' in report


def test_the_log_names_auto_and_why(tmp_path, monkeypatch, capsys):
    _native_bf16(monkeypatch, {"amx_bf16"})
    cfg = tiny_config(tmp_path, model=saved_tiny_model(tmp_path), device="cpu", steps=1)
    Trainer(cfg)
    err = capsys.readouterr().err
    assert "precision: bf16 autocast over float32 weights (the CPU computes bf16 natively: AMX)" in err
    _native_bf16(monkeypatch, set())
    Trainer(tiny_config(tmp_path, model=cfg.model, device="cpu", steps=1, output_dir=str(tmp_path / "other")))
    assert "precision: float32 weights and compute (the CPU has no native bf16" in capsys.readouterr().err


def test_a_checkpoint_written_under_autocast_resumes(tmp_path):
    """Weights and optimizer state are float32 in the checkpoint; a resumed run equals the uninterrupted one."""
    common = dict(steps=3, checkpoint_every=1)
    full = _trainer(tmp_path, "full", "autocast_bf16", **common)
    full_result = full.train()
    part = _trainer(tmp_path, "part", "autocast_bf16", **common)
    part.cfg.steps = 2  # the same schedule, but the process stops after step 2
    part.train()
    from safetensors import safe_open

    folder = tmp_path / "part" / "checkpoints" / "step-000002"
    dtypes = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert "F32" in dtypes and not dtypes & {"BF16", "F16"}, dtypes  # U8: the RNG states
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "part"), dtype="autocast_bf16", resume=True, **common)
    resumed = Trainer(cfg, loaded=_loaded(seed=123))  # another init: the checkpoint must win
    result = resumed.train()
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert result.after == full_result.after
