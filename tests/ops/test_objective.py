"""PolicyObjective: one value for the objective, its checks, the loss types' field rules and partial normalisers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import pytest
import torch

from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss, fused_linear_grpo_loss_reference
from rlvr_fast.ops.grpo_loss import (
    METRIC_NAMES,
    TOKEN_MEAN_METRICS,
    GrpoLossMetrics,
    grpo_loss,
    grpo_loss_reference,
)
from rlvr_fast.ops.loss_types import IS_LEVELS, LOSS_TYPES, StepShare
from rlvr_fast.ops.objective import DEFAULT, FIELDS, PolicyObjective, objective_from_arguments
from rlvr_fast.testing import assert_close
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.parallel import world
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.update import loss as update_loss
from rlvr_fast.trainer.update.loss import objective_from_config

OPTIONAL_FIELDS = {"max_completion_length": 16, "num_items": 7.0}


def _flat(loss_type: str, T: int) -> dict:
    """A non-default objective of ``loss_type`` as flat keyword arguments (every field it may read set)."""
    flat = dict(loss_type=loss_type, beta=0.03, kl="k2", eps_low=0.15, eps_high=0.3, dual_clip=2.5)
    flat["importance_sampling"] = "sequence"
    flat["kl_ratio_weighted"] = True
    if LOSS_TYPES[loss_type].reads("max_completion_length"):
        flat["max_completion_length"] = T + 3
    if LOSS_TYPES[loss_type].reads("num_items"):
        flat["num_items"] = 11.0
    return flat


def _batch(B: int, T: int, generator, dtype=torch.float64):
    logp = (-torch.rand(B, T, generator=generator, dtype=dtype) * 3).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(B, T, generator=generator, dtype=dtype)).clamp(max=0.0)
    ref = (logp.detach() + 0.3 * torch.randn(B, T, generator=generator, dtype=dtype)).clamp(max=0.0)
    adv = torch.randn(B, generator=generator, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, ref, adv, mask


# --------------------------------------------------------------------------------------------------------------------
# Flat keyword arguments and objective= are the same call
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_grpo_loss_flat_arguments_equal_objective(loss_type, generator):
    B, T = 4, 6
    logp, old, ref, adv, mask = _batch(B, T, generator)
    flat = _flat(loss_type, T)
    objective = PolicyObjective(**flat)
    for op, extra in ((grpo_loss, {"backend": "torch"}),):  # the reference takes objective= only
        results = []
        for kwargs in (flat, {"objective": objective}):
            loss, metrics = op(logp, old, ref, adv, mask, **kwargs, **extra)
            (grad,) = torch.autograd.grad(loss, logp)
            results.append((loss.detach(), grad, metrics.as_dict()))
        (loss_a, grad_a, m_a), (loss_b, grad_b, m_b) = results
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b), op.__name__
        assert m_a == m_b


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_fused_linear_flat_arguments_equal_objective(loss_type, generator):
    B, T, D, V = 3, 5, 8, 13
    hidden = torch.randn(B, T, D, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=generator)
    _, old, ref, adv, mask = _batch(B, T, generator)
    flat = {**_flat(loss_type, T), "temperature": 0.7}
    objective = PolicyObjective(**flat)
    for op, extra in ((fused_linear_grpo_loss, {"backend": "torch"}),):  # the reference takes objective= only
        results = []
        for kwargs in (flat, {"objective": objective}):
            loss, _ = op(hidden, weight, targets, mask, adv, old_logp=old, ref_logp=ref, **kwargs, **extra)
            results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
        for a, b in zip(*results):
            assert torch.equal(a, b), op.__name__


def test_objective_and_flat_arguments_together_are_refused(generator):
    logp, old, ref, adv, mask = _batch(2, 3, generator)
    with pytest.raises(TypeError, match=r"not both: got objective= and eps_low=0\.3"):
        grpo_loss(logp, old, ref, adv, mask, eps_low=0.3, objective=PolicyObjective())
    with pytest.raises(TypeError, match="objective must be a PolicyObjective"):
        grpo_loss(logp, old, ref, adv, mask, objective={"beta": 0.1})
    # flat arguments left at their defaults are not a conflict
    grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, objective=PolicyObjective(eps_low=0.2), backend="torch")


# --------------------------------------------------------------------------------------------------------------------
# Validation, in the object
# --------------------------------------------------------------------------------------------------------------------


def test_eps_high_defaults_to_eps_low_and_values_are_normalised():
    assert PolicyObjective(eps_low=0.3) == PolicyObjective(eps_low=0.3, eps_high=0.3)
    objective = PolicyObjective(loss_type="dapo", beta=1, num_items=torch.tensor(12), temperature=2)
    assert objective.num_items == 12.0 and isinstance(objective.num_items, float)
    assert isinstance(objective.beta, float) and isinstance(objective.temperature, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        objective.beta = 0.5


@pytest.mark.parametrize(
    "fields, exc, pattern",
    [
        ({"loss_type": "ppo"}, ValueError, r"unknown loss_type 'ppo'; valid loss types"),
        ({"kl": "k4"}, ValueError, r"unknown kl 'k4'"),
        ({"importance_sampling": "seq"}, ValueError, r"unknown importance_sampling 'seq'"),
        ({"beta": -1.0}, ValueError, r"PolicyObjective: beta must be >= 0.0, got -1.0"),
        ({"beta": True}, ValueError, r"beta must be a finite real number, got True"),
        ({"eps_low": 2.0}, ValueError, r"eps_low must be <= 1.0, got 2.0"),
        ({"eps_high": float("nan")}, ValueError, r"eps_high must be a finite real number"),
        ({"dual_clip": 1.0}, ValueError, r"dual_clip must be > 1.0, got 1.0"),
        ({"temperature": 0.0}, ValueError, r"temperature must be a positive number, got 0.0"),
        ({"loss_type": "dr_grpo", "max_completion_length": 0}, ValueError, r"max_completion_length must be >= 1"),
        ({"loss_type": "dr_grpo", "max_completion_length": 4.0}, TypeError, r"max_completion_length must be an int"),
        ({"num_items": -1}, ValueError, r"num_items must be > 0"),
        ({"num_items": torch.ones(3)}, ValueError, r"num_items must be a number or a one-element tensor"),
        ({"kl_ratio_weighted": True}, ValueError, r"kl_ratio_weighted=True weights the KL term, which needs beta > 0"),
        ({"beta": 0.1, "kl_ratio_weighted": 1}, TypeError, r"kl_ratio_weighted must be a bool, got 1"),
    ],
)
def test_bad_fields_raise_naming_the_field(fields, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PolicyObjective(**fields)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.parametrize("field", sorted(OPTIONAL_FIELDS))
def test_a_loss_type_refuses_a_field_it_does_not_read(loss_type, field):
    lt = LOSS_TYPES[loss_type]
    required = {name: OPTIONAL_FIELDS[name] for name in lt.requires}
    if lt.reads(field):
        PolicyObjective(loss_type=loss_type, **{**required, field: OPTIONAL_FIELDS[field]})
        return
    users = sorted(n for n, t in LOSS_TYPES.items() if t.reads(field))
    expected = re.escape(f"is used only by loss types {users}; loss_type={loss_type!r} does not read it")
    with pytest.raises(ValueError, match=rf"{field}=\S+ {expected}"):
        PolicyObjective(loss_type=loss_type, **{**required, field: OPTIONAL_FIELDS[field]})
    # from_settings refuses it too: nothing is dropped silently
    with pytest.raises(ValueError, match=rf"{field}=\S+ {expected}"):
        PolicyObjective.from_settings(loss_type=loss_type, **{**required, field: OPTIONAL_FIELDS[field]})


def test_a_loss_type_requires_what_it_needs():
    for name, lt in LOSS_TYPES.items():
        for field in lt.requires:
            with pytest.raises(ValueError, match=rf"loss_type='{name}' needs {field}, got None"):
                PolicyObjective(loss_type=name)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_trainer_objective_from_config(loss_type):
    cfg = RLVRConfig(loss_type=loss_type, beta=0.02, eps_low=0.1, eps_high=0.3, temperature=0.9)
    objective = objective_from_config(cfg)
    assert (objective.loss_type, objective.beta, objective.eps_low, objective.eps_high) == (loss_type, 0.02, 0.1, 0.3)
    assert objective.temperature == 0.9 and objective.kl == cfg.kl and objective.num_items is None
    reads_length = LOSS_TYPES[loss_type].reads("max_completion_length")
    assert objective.max_completion_length == (cfg.max_completion_length if reads_length else None)


# --------------------------------------------------------------------------------------------------------------------
# The partial normaliser: micro-batches of the kept completions reproduce the whole step
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_partial_normaliser_reproduces_the_step(loss_type, importance_sampling, generator):
    """A step of B completions, some with A == 0 (beta = 0: zero gradient, skipped before the loss runs, as the trainer
    does) and one fully masked: the kept completions in uneven micro-batches, each normalised by its loss type's
    partial normaliser, sum to the loss and the gradient of the whole step computed in one call."""
    B, T = 9, 7
    logp, old, ref, adv, mask = _batch(B, T, generator)
    adv[[1, 4, 5]] = 0.0  # skipped
    mask[6] = False  # counts in grpo's / dr_grpo's row count, contributes no token
    flat = {"loss_type": loss_type, "beta": 0.0, "importance_sampling": importance_sampling, "eps_high": 0.28}
    objective = PolicyObjective.from_settings(**flat, generation_length=T + 2)
    full, _ = grpo_loss_reference(logp, old, ref, adv, mask, objective=objective)
    (full_grad,) = torch.autograd.grad(full, logp)

    kept = torch.tensor([b for b in range(B) if adv[b] != 0])
    step_rows, step_tokens = B, float(mask.sum())
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(logp)
    for part in (kept[:1], kept[1:4], kept[4:]):  # uneven micro-batches
        share = StepShare.of_part(len(part), float(mask[part].sum()), step_rows, step_tokens)
        part_objective, scale = objective.for_share(share)
        lp = logp.detach()[part].requires_grad_(True)
        loss, _ = grpo_loss(lp, old[part], ref[part], adv[part], mask[part], objective=part_objective, backend="torch")
        loss = loss * scale
        (g,) = torch.autograd.grad(loss, lp)
        total += loss.detach()
        grad[part] = g
    assert_close(total, full.detach(), rtol=1e-12, atol=1e-15, name="loss")
    assert_close(grad, full_grad, rtol=1e-12, atol=1e-15, name="d loss / d logp")


def test_equal_parts_weigh_each_call_alike():
    """TRL's convention: each of n micro-batches weighs 1 / n; dapo receives the step's token count instead."""
    share = StepShare.equal_parts(4, 40.0)
    for name, lt in LOSS_TYPES.items():
        part = lt.partial_normaliser(share)
        if lt.reads("num_items"):
            assert (part.num_items, part.scale) == (40.0, 1.0), name
        else:
            assert (part.num_items, part.scale) == (None, 0.25), name
    with pytest.raises(ValueError, match="n_parts must be >= 1, got 0"):
        StepShare.equal_parts(0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# One set of defaults and rules: the ops' flat keywords, from_settings, RLVRConfig, the metric names
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [grpo_loss, fused_linear_grpo_loss])
def test_op_flat_keywords_are_the_objective_fields_with_its_defaults(op):
    params = inspect.signature(op).parameters
    flat = {name: p for name, p in params.items() if name in FIELDS}
    # grpo_loss receives log-probs that already include the temperature
    expected = set(FIELDS) - ({"temperature"} if op is grpo_loss else set())
    assert set(flat) == expected
    for name, p in flat.items():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name  # nobody can pass them positionally
        default = next(f.default for f in dataclasses.fields(PolicyObjective) if f.name == name)
        assert p.default == default and getattr(DEFAULT, name) == default, name


@pytest.mark.parametrize("op", [grpo_loss_reference, fused_linear_grpo_loss_reference], ids=lambda f: f.__name__)
def test_references_take_the_objective_only(op, generator):
    """The specifications have one calling form: no flat objective keyword (a TypeError names it), objective=."""
    params = inspect.signature(op).parameters
    assert not set(params) & set(FIELDS)
    assert params["objective"].kind is inspect.Parameter.KEYWORD_ONLY and params["objective"].default is None
    B, T, D, V = 2, 3, 4, 5
    logp, old, ref, adv, mask = _batch(B, T, generator)
    hidden = torch.randn(B, T, D, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=generator)
    if op is grpo_loss_reference:
        call = functools.partial(op, logp, old, ref, adv, mask)
    else:
        call = functools.partial(op, hidden, weight, targets, mask, adv, old_logp=old, ref_logp=ref)
    for field in ("beta", "loss_type", "eps_high"):
        with pytest.raises(TypeError, match=rf"unexpected keyword argument '{field}'"):
            call(**{field: getattr(PolicyObjective(beta=0.1), field)})
    loss, _ = call(objective=PolicyObjective(beta=0.1, eps_high=0.28))
    default_loss, _ = call()  # None: PolicyObjective()'s defaults
    assert torch.equal(default_loss, call(objective=PolicyObjective())[0]) and not torch.equal(loss, default_loss)


def test_objective_from_arguments_refuses_a_name_that_is_no_field():
    with pytest.raises(TypeError, match=r"grpo_loss: \['epsilon'\] are not objective fields"):
        objective_from_arguments("grpo_loss", None, epsilon=0.2)


def test_from_settings_takes_the_generation_length_for_the_loss_types_that_read_one():
    for name, lt in LOSS_TYPES.items():
        required = {"num_items": 3.0} if "num_items" in lt.requires else {}
        objective = PolicyObjective.from_settings(loss_type=name, generation_length=24, **required)
        assert objective.max_completion_length == (24 if lt.reads("max_completion_length") else None), name
    with pytest.raises(TypeError, match="generation_length or max_completion_length, not both"):
        PolicyObjective.from_settings(loss_type="dr_grpo", generation_length=4, max_completion_length=4)


def test_config_objective_rules_are_the_objective_s_and_name_the_config_field():
    # eps_low = 1: the lower clip bound is ratio 0, which exp(.) never reaches (no lower clip): valid in both
    assert RLVRConfig(eps_low=1.0).validate().objective().eps_low == 1.0
    for fields, name, message in (
        ({"eps_low": 1.5}, "eps_low", "RLVRConfig.eps_low must be <= 1.0, got 1.5"),
        ({"eps_high": -0.1}, "eps_high", "RLVRConfig.eps_high must be >= 0.0, got -0.1"),
        ({"dual_clip": 1.0}, "dual_clip", "RLVRConfig.dual_clip must be > 1.0, got 1.0"),
        ({"beta": -0.5}, "beta", "RLVRConfig.beta must be >= 0.0, got -0.5"),
        ({"kl_ratio_weighted": True}, "kl_ratio_weighted", "RLVRConfig.kl_ratio_weighted=True weights the KL term"),
    ):
        with pytest.raises(ConfigFieldError, match=re.escape(message)) as info:
            RLVRConfig(**fields).validate()
        assert info.value.field == name


def test_metric_names_come_from_the_metrics_type():
    names = tuple(f.name for f in dataclasses.fields(GrpoLossMetrics) if f.name != "backend")
    assert names == METRIC_NAMES
    assert tuple(n for n in names if n not in ("tokens", "tokens_skipped")) == TOKEN_MEAN_METRICS
    assert world.TOKEN_MEAN_METRICS is TOKEN_MEAN_METRICS
    assert update_loss.TOKEN_MEAN_METRICS is TOKEN_MEAN_METRICS


def test_an_op_validates_each_setting_once_and_never_confuses_equal_hashes():
    """objective_from_arguments keeps the objective of each set of flat arguments (the ops are called with the same
    few every micro-step): the same object comes back, and a value that hashes like a valid one (True like 1.0) is
    still refused, as is a value refused a second time."""
    from rlvr_fast.ops.objective import objective_from_arguments

    first = objective_from_arguments("op", None, beta=1.0, loss_type="grpo")
    assert objective_from_arguments("op", None, loss_type="grpo", beta=1.0) is first
    for _ in range(2):
        with pytest.raises(ValueError, match="beta must be a finite real number, got True"):
            objective_from_arguments("op", None, beta=True, loss_type="grpo")
    assert objective_from_arguments("op", None, beta=0.5, loss_type="grpo").beta == 0.5
