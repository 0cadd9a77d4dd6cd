"""The GRPO-family objective as one value: everything ``grpo_loss`` / ``fused_linear_grpo_loss`` need besides tensors.

``PolicyObjective`` is what the trainer, the TRL integration, the benchmarks and the ops pass around instead of a dozen
keyword arguments. It checks its fields when built (one place, errors naming the field); the loss-type registry
(``rlvr_fast.ops.loss_types.LOSS_TYPES``) decides which optional fields a loss type reads (``max_completion_length``
for dr_grpo, ``num_items`` for dapo; passing one to a loss type that does not read it is an error, never silently
ignored) and how a call holding part of a step is normalised (``for_share``). Formulas: docs/design.md §2.

The defaults live here only: the public ops keep their flat keyword arguments (the API users embed), whose defaults
are read from ``DEFAULT`` (this dataclass's own defaults), and build the object from them in one place
(``objective_from_arguments``, which refuses a name that is not a field); they also take
``objective=PolicyObjective(...)``. A field error names its field (``error_field``), so a caller that holds the same
settings under the same names (``RLVRConfig``) reports it as its own field instead of re-checking the rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import namedtuple
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlvr_fast.ops.checks import finite_number, is_real_number
from rlvr_fast.ops.loss_types import (
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    AggregationContext,
    KLEstimator,
    LossType,
    StepShare,
)
from rlvr_fast.ops.rollout_correction import DEFAULT_CAP, ROLLOUT_CORRECTIONS, RolloutCorrection

WHERE = "PolicyObjective"


@dataclass(frozen=True)
class PolicyObjective:
    """The GRPO-family policy objective (docs/design.md §2; the registries in ``rlvr_fast.ops.loss_types``).

    loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo": how the per-token loss is aggregated (``LOSS_TYPES``).
    beta: KL coefficient, >= 0 (0: no reference model needed).
    kl: KL estimator of d = ref - logp: "k1" | "k2" | "k3" | "low_var_kl" (``KL_ESTIMATORS``).
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio; eps_low in [0, 1], eps_high >= 0
        (None: eps_low; DAPO's clip-higher uses 0.28). eps_low = 1 puts the lower bound at ratio 0, which a ratio
        exp(.) never reaches: no lower clip, a valid objective, not an error.
    dual_clip: c > 1 caps the loss of negative-advantage tokens at -c A (dual-clip PPO, Ye et al. 2020), or None.
    importance_sampling: "token" (PPO ratio per token) or "sequence" (GSPO's length-normalised sequence ratio).
    temperature: > 0, the rollout's sampling temperature; ops that form logits divide them by it (``grpo_loss``
        receives log-probs that already include it and does not read it).
    max_completion_length: dr_grpo's fixed length L (the normaliser B * L); read by dr_grpo only, which requires it.
    num_items: dapo's denominator, the active tokens of the whole accumulated step (divided by the data-parallel
        world size); read by dapo only (default: the call's own token count). A one-element tensor is read once on
        the host.
    kl_ratio_weighted: the KL term is r * KL with r the (differentiable, unclipped) importance ratio of the loss's
        level (token rho_t or sequence s_b): TRL's ``use_bias_correction_kl`` (DeepSeek-V3.2's unbiased KL estimate
        under off-policy samples). Only meaningful with a KL in the loss, so it requires beta > 0.
    rollout_correction: None | "token_truncate" | "sequence_truncate": truncated importance sampling of the rollout
        engine's samples (``rlvr_fast.ops.rollout_correction``; TRL's vllm_importance_sampling_mode): each token's
        policy term weighted by min(exp(old - rollout_logp), C), per token or per completion. The ops then need
        ``rollout_logp``.
    rollout_correction_cap: C > 0 (TRL's vllm_importance_sampling_clip_max, default 3.0); read only with a
        rollout_correction.
    """

    loss_type: str = "dapo"
    beta: float = 0.0
    kl: str = "k3"
    eps_low: float = 0.2
    eps_high: float | None = None
    dual_clip: float | None = None
    importance_sampling: str = "token"
    temperature: float = 1.0
    max_completion_length: int | None = None
    num_items: float | None = None
    kl_ratio_weighted: bool = False
    rollout_correction: str | None = None
    rollout_correction_cap: float = DEFAULT_CAP

    def __post_init__(self):
        def put(name: str, value) -> None:  # frozen: normalised values are written once, here
            object.__setattr__(self, name, value)

        for name, registry, what in (
            ("kl", KL_ESTIMATORS, "KL estimators"),
            ("loss_type", LOSS_TYPES, "loss types"),
            ("importance_sampling", IS_LEVELS, "levels"),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in registry:
                with _field(name):
                    raise ValueError(f"{WHERE}: unknown {name} {value!r}; valid {what}: {sorted(registry)}")
        with _field("beta"):
            put("beta", finite_number(WHERE, "beta", self.beta, low=0.0))
        with _field("eps_low"):
            put("eps_low", finite_number(WHERE, "eps_low", self.eps_low, low=0.0, high=1.0))
        with _field("eps_high"):
            high = self.eps_low if self.eps_high is None else finite_number(WHERE, "eps_high", self.eps_high, low=0.0)
            put("eps_high", high)
        if self.dual_clip is not None:
            # The dual bound -c A must sit above the clipped loss |A| (1 - eps_low) to cap anything (verl: c > 1).
            with _field("dual_clip"):
                put("dual_clip", finite_number(WHERE, "dual_clip", self.dual_clip, low=1.0, low_open=True))
        t = self.temperature
        with _field("temperature"):
            if not is_real_number(t) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"{WHERE}: temperature must be a positive number, got {t!r}")
            put("temperature", float(t))
        self._check_loss_type_fields()
        if self.max_completion_length is not None:
            L = self.max_completion_length
            with _field("max_completion_length"):
                if isinstance(L, bool) or not isinstance(L, int):
                    raise TypeError(f"{WHERE}: max_completion_length must be an int, got {L!r}")
                if L < 1:
                    raise ValueError(f"{WHERE}: max_completion_length must be >= 1, got {L}")
        if self.num_items is not None:
            with _field("num_items"):
                put("num_items", _positive_count(self.num_items))
        with _field("kl_ratio_weighted"):
            if not isinstance(self.kl_ratio_weighted, bool):
                raise TypeError(f"{WHERE}: kl_ratio_weighted must be a bool, got {self.kl_ratio_weighted!r}")
            if self.kl_ratio_weighted and self.beta == 0.0:
                # never silently ignored: with beta = 0 there is no KL term for the ratio to weight
                raise ValueError(
                    f"{WHERE}: kl_ratio_weighted=True weights the KL term, which needs beta > 0, got beta=0.0"
                )
        with _field("rollout_correction"):
            name = self.rollout_correction
            if name is not None and (not isinstance(name, str) or name not in ROLLOUT_CORRECTIONS):
                raise ValueError(
                    f"{WHERE}: unknown rollout_correction {name!r}; "
                    f"expected None or one of {sorted(ROLLOUT_CORRECTIONS)}"
                )
            if name == "token_truncate" and self.importance_sampling == "sequence":
                # GSPO's one ratio per completion under per-token weights needs sum_t m_t w_t in the closed-form
                # gradient, which the kernels do not form: refused rather than computed wrong
                raise ValueError(
                    f"{WHERE}: rollout_correction='token_truncate' is not supported with importance_sampling="
                    f"'sequence' (GSPO); expected rollout_correction='sequence_truncate' or None"
                )
        with _field("rollout_correction_cap"):
            put(
                "rollout_correction_cap",
                finite_number(WHERE, "rollout_correction_cap", self.rollout_correction_cap, low=0.0, low_open=True),
            )

    def _check_loss_type_fields(self) -> None:
        """The loss type alone says which optional fields it reads: one it does not read is refused, by name."""
        lt = self.aggregation
        for name in ("max_completion_length", "num_items"):
            value = getattr(self, name)
            with _field(name):
                if value is not None and not lt.reads(name):
                    users = sorted(n for n, t in LOSS_TYPES.items() if t.reads(name))
                    raise ValueError(
                        f"{WHERE}: {name}={value!r} is used only by loss types {users}; "
                        f"loss_type={self.loss_type!r} does not read it"
                    )
                if value is None and name in lt.requires:
                    raise ValueError(f"{WHERE}: loss_type={self.loss_type!r} needs {name}, got None")

    # ---- the registry rows it selects ---------------------------------------------------------------------------

    @property
    def aggregation(self) -> LossType:
        """The loss type's registry row (normaliser, per-sequence mean, fields read, partial normaliser)."""
        return LOSS_TYPES[self.loss_type]

    @property
    def kl_estimator(self) -> KLEstimator:
        return KL_ESTIMATORS[self.kl]

    @property
    def correction(self) -> RolloutCorrection | None:
        """The rollout correction's registry row, or None when off."""
        return None if self.rollout_correction is None else ROLLOUT_CORRECTIONS[self.rollout_correction]

    @property
    def sequence_level(self) -> bool:
        """GSPO: one importance ratio per completion."""
        return self.importance_sampling == "sequence"

    # ---- normalisation ---------------------------------------------------------------------------------------------

    def denominator(self, n_rows: int, token_count: torch.Tensor) -> torch.Tensor | float:
        """The loss type's D for a call of ``n_rows`` completions whose mask weights sum to ``token_count`` (0-d): a
        Python float when it is known on the host (no host-to-device copy), else a 0-d tensor."""
        ctx = AggregationContext(
            n_rows=n_rows,
            token_count=token_count,
            max_completion_length=self.max_completion_length,
            num_items=self.num_items,
        )
        return self.aggregation.denominator(ctx)

    def for_share(self, share: StepShare) -> tuple[PolicyObjective, float]:
        """(the objective of one call holding ``share`` of a step, the factor to multiply that call's loss by), so
        that the calls' gradients sum to the whole step's (``loss_types`` module doc, "Part of a step")."""
        part = self.aggregation.partial_normaliser(share)
        objective = self if part.num_items is None else dataclasses.replace(self, num_items=part.num_items)
        return objective, part.scale

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, *, generation_length: int | None = None, **fields: Any) -> PolicyObjective:
        """Build from a run's settings: ``fields`` are objective fields, kept as given (one its loss type does not
        read is refused by name, as by the constructor); ``generation_length`` is the run's cap on completion length,
        which every trainer has: it becomes ``max_completion_length`` (dr_grpo's L) for the loss types that read
        one, and is no part of the objective for the others (it still caps their generation)."""
        if generation_length is not None:
            if "max_completion_length" in fields:
                raise TypeError(f"{WHERE}: pass generation_length or max_completion_length, not both")
            lt = LOSS_TYPES.get(fields.get("loss_type", DEFAULT.loss_type))
            if lt is not None and lt.reads("max_completion_length"):
                fields["max_completion_length"] = generation_length
        return cls(**fields)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PolicyObjective))
# The one set of defaults, as attributes (``DEFAULT.beta``): the public ops' flat keyword defaults read it. These are
# the dataclass's raw defaults (eps_high None = "eps_low"), not a built object's normalised values.
DEFAULT = namedtuple("ObjectiveDefaults", FIELDS)(**{f.name: f.default for f in dataclasses.fields(PolicyObjective)})


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """Tag a ValueError / TypeError raised inside with the field it is about (read by ``error_field``)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        exc.objective_field = name  # type: ignore[attr-defined]
        raise


def error_field(exc: BaseException) -> str | None:
    """The objective field a ``PolicyObjective(...)`` error is about, or None for an error of another origin."""
    return getattr(exc, "objective_field", None)


def _positive_count(num_items) -> float:
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.is_complex():
            raise ValueError(
                f"{WHERE}: num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}"
            )
        num_items = num_items.item()
    if not is_real_number(num_items) or not math.isfinite(num_items) or num_items <= 0:
        raise ValueError(
            f"{WHERE}: num_items must be > 0 (the active-token count of the whole accumulated batch), got {num_items!r}"
        )
    return float(num_items)


def flat_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The objective fields among an op's arguments (its ``locals()`` on entry): an op names each flat keyword once,
    in its signature, and hands them on together."""
    return {name: arguments[name] for name in FIELDS if name in arguments}


@functools.lru_cache(maxsize=256)
def _objective_of(key: tuple[tuple[str, type, Any], ...]) -> PolicyObjective:
    """The (frozen) objective of flat arguments keyed with their types (``True`` is not ``1.0`` here, although the two
    hash alike); refusals raise and are not cached."""
    return PolicyObjective(**{name: value for name, _, value in key})


def objective_from_arguments(where: str, objective: PolicyObjective | None, **flat: Any) -> PolicyObjective:
    """The objective of an op call: ``objective`` when given (then every flat objective argument must be left at its
    default), else one built from the flat keyword arguments. The one place the ops' flat keywords are checked."""
    unknown = sorted(set(flat) - set(FIELDS))
    if unknown:
        raise TypeError(f"{where}: {unknown} are not objective fields; valid: {list(FIELDS)}")
    if objective is None:
        try:  # an op is called with the same few settings every micro-step: validate each set once per process
            return _objective_of(tuple((name, type(value), value) for name, value in sorted(flat.items())))
        except TypeError:  # an unhashable value (a tensor num_items), or a refusal: built (and refused) afresh
            return PolicyObjective(**flat)
    if not isinstance(objective, PolicyObjective):
        raise TypeError(f"{where}: objective must be a PolicyObjective or None, got {type(objective).__name__}")
    for name, value in flat.items():
        default = getattr(DEFAULT, name)
        if value is not default and (isinstance(value, torch.Tensor) or value != default):
            raise TypeError(
                f"{where}: pass the objective either as objective= or as flat keyword arguments, not both: got "
                f"objective= and {name}={value!r}"
            )
    return objective
