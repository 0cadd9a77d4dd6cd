"""The training loop. ``Trainer`` has three phases, each a visible call:

1. construction: the configuration and the data are checked before the model loads; then model, reference model,
   optimizer and learning-rate schedule (the optimizer of a gradient-saliency mask waits for phase 2);
2. ``warm_up_masks()``: the warm-up rollouts of a ``mask_source=grad:...`` mask, then its optimizer (a no-op otherwise);
3. ``train()``: the evaluation before, the steps, the evaluation after, the report.

One step (``train_step``) reads top to bottom: rollout -> rewards -> advantages -> difficulty filter -> update batch
-> update (``num_iterations`` optimizer steps) -> metrics record. Everything random is seeded per step from the run's
seed, so ``--resume`` reproduces an uninterrupted run.

Under torchrun (``trainer/parallel/``) each rank generates its share of the step's groups, every rank scores the
whole step, and the update's normalisers are the whole step's: one process or N, the same step (docs/design.md, "Data
parallelism"). Only rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from rlvr_fast.eval import format_frequency
from rlvr_fast.optim import GradSaliency
from rlvr_fast.trainer.adapters import apply_adapter
from rlvr_fast.trainer.adapters.checkpoint import save_adapter_checkpoint, write_peft_adapter
from rlvr_fast.trainer.checkpoint.local import load_checkpoint, save_checkpoint
from rlvr_fast.trainer.checkpoint.run_lock import release_run_lock
from rlvr_fast.trainer.checkpoint.sharded import load_sharded_checkpoint, save_sharded_checkpoint
from rlvr_fast.trainer.checks.preflight import preflight
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import EvalResult, eval_dict_from_json, evaluate, evaluation_kwargs
from rlvr_fast.trainer.model import LoadedModel, load_model
from rlvr_fast.trainer.parallel.world import TrainingWorld
from rlvr_fast.trainer.precision import precision_of_loaded
from rlvr_fast.trainer.reporting.floor import (
    ModelWork,
    StepWork,
    ceilings_for,
    floor_record,
    optimizer_bytes,
    part_costs,
)
from rlvr_fast.trainer.reporting.log import MemoryLog, MetricsLog, Progress, iteration_metrics, peak_memory_bytes
from rlvr_fast.trainer.reporting.report import before_after_rows, table, write_report
from rlvr_fast.trainer.reporting.step_timer import StepTimer
from rlvr_fast.trainer.rollout.data import Problem, batch_indices, chat_prompt, check_prompt_lengths, load_problems
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.rollout.registry import ROLLOUT_ENGINES, resolve_rollout_engine
from rlvr_fast.trainer.rollout.seeds import derived_seed
from rlvr_fast.trainer.step import (
    PreparedStep,
    Scorer,
    UpdateBatch,
    apply_difficulty_filter,
    build_update_batch,
    compute_advantages,
)
from rlvr_fast.trainer.trajectories.processor import TrajectoryProcessor
from rlvr_fast.trainer.update.finite_guard import checked_update, rollout_of_step
from rlvr_fast.trainer.update.loss import plan_micro_batches_by_config, policy_step, sequence_logprobs
from rlvr_fast.trainer.update.memory import (
    enable_activation_checkpointing,
    release_free_host_memory,
    return_freed_host_memory,
)
from rlvr_fast.trainer.update.micro_batches import MicroBatchPlan
from rlvr_fast.trainer.update.optimizers import build_optimizer, saliency_warmup, trainable_parameters
from rlvr_fast.trainer.update.schedule import build_scheduler
from rlvr_fast.trainer.update.shared_prefix_forward import resolve_prefix_sharing


@dataclass
class RunResult:
    output_dir: str
    before: dict
    after: dict
    metrics: list[dict]
    table: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One run: ``Trainer(cfg)`` (phase 1), ``warm_up_masks()`` (phase 2), ``train()`` (phase 3; it calls phase 2 first,
    which is a no-op once done). ``loaded``: a model already loaded (tests, the arms of a study), else ``cfg.model``."""

    # ---- phase 1: construction ---------------------------------------------------------------------------------------

    def __init__(self, cfg: RLVRConfig, loaded: LoadedModel | None = None):
        self.cfg = cfg.validate()
        self.world = TrainingWorld.from_environment(cfg)  # one process, or this rank of a torchrun world
        seed_everything(cfg.seed)
        self.scorer = Scorer(cfg)  # checks reward modes before the model loads
        self.trajectories = TrajectoryProcessor(cfg, self.world)  # replay store, lessons (trainer/trajectories)
        self.train_problems, self.eval_problems = load_problems(cfg)
        # output folder, resume checks: before loading; rank 0 prepares the folder and verifies the checkpoint
        self.resume_point = self.world.main_decides(lambda: preflight(cfg, check_model=loaded is None))
        self.loaded = loaded or load_model(cfg)
        self.adapter = apply_adapter(cfg, self.loaded.model)  # LoRA / QLoRA in place (trainer/adapters); None: full
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.precision = self.loaded.precision or precision_of_loaded(cfg.dtype, self.loaded.device, self.loaded.dtype)
        if self.world.is_main:  # the choice and why, once at start (trainer/precision.py)
            print(self.precision.describe(), file=sys.stderr)
        if loaded is not None:  # preflight measured the prompts with the model's tokenizer only when it loads the model
            check_prompt_lengths(cfg, self.tokenizer, self.train_problems + self.eval_problems)
        checkpointing = cfg.gradient_checkpointing
        if checkpointing if checkpointing is not None else self.loaded.device.type == "cuda":
            enable_activation_checkpointing(self.model)
        if self.loaded.device.type == "cpu":
            return_freed_host_memory()
        # One setting for the update (here) and the rollout (HFGeneration): auto says once, by model class, when it
        # cannot apply; on refuses such a model now, before any step. Under torchrun too: the shared passes run inside
        # the data-parallel wrapper's forward (parallel.wrappers.HiddenStateForward)
        self.prefix_sharing = resolve_prefix_sharing(self.model, cfg.prefix_sharing)
        # the rollout engine (rollout/registry.py; preflight checked it): native, or vLLM synced after every step;
        # auto resolved again now that the model is known (an architecture vLLM lacks goes to the native sampler)
        self.rollout_engine, why = resolve_rollout_engine(cfg, self.model)
        if self.world.is_main and cfg.rollout_engine == "auto":
            print(f"rollout engine: {self.rollout_engine} ({why})", file=sys.stderr)
        self.generator = ROLLOUT_ENGINES[self.rollout_engine].build(self)
        self.timer = StepTimer(self.loaded.device)  # the current step's (train_step starts a new one)
        # Each part's floor (reporting/floor.py): the model's matmul size; the machine's ceilings at the first step
        self.model_work = ModelWork.of(self.model, self.compute_dtype)
        self.recomputes = any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules())
        self.ref_model = None
        if cfg.beta > 0 and self.adapter is None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        device, dtype = self.loaded.device, self.loaded.dtype
        self.policy = self.world.wrap(self.model, dtype, device)  # DDP / FSDP2 under torchrun; as is on one process
        self.ref = (
            self.world.wrap(self.ref_model, dtype, device, trainable=False) if self.ref_model is not None else None
        )
        if cfg.beta > 0 and self.adapter is not None:  # the reference: the policy with its adapters off, no copy
            self.ref_model, self.ref = self.model, self.adapter.reference(self.policy)
        self.completions_sampled = 0  # over the run, toward rollout_budget (restored on resume)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if saliency_warmup(cfg) is None:  # otherwise warm_up_masks() builds them
            self._build_optimizer(masks=None)
        os.makedirs(cfg.output_dir, exist_ok=True)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model's matmuls run in."""
        return self.precision.compute

    def _build_optimizer(self, masks: dict[str, torch.Tensor] | None) -> None:
        self.optimizer = build_optimizer(self.cfg, self.model, masks)
        self.scheduler = build_scheduler(
            self.optimizer,
            schedule=self.cfg.lr_schedule,
            warmup_steps=self.cfg.warmup_steps,
            total_steps=self.cfg.steps,
        )

    # ---- phase 2: the warm-up of a gradient-saliency mask ------------------------------------------------------------

    def warm_up_masks(self) -> None:
        """For ``mask_source=grad:<density>[:<rollouts>]``: ``rollouts`` warm-up rollouts through the same rewards,
        advantages, filter and update batch as a step, their gradients accumulated into a ``GradSaliency`` with no
        optimizer step (they are not training steps; their prompts and seeds are apart from the steps'); then the
        optimizer on the global top-``density`` mask, and its schedule.

        Runs once: afterwards, and for every other optimizer, a no-op. ``train()`` calls it first. A resumed run warms
        up again on the base weights before its checkpoint loads (the masks are not stored in the checkpoint): the
        same masks, which ``SparseAdamW.load_state_dict`` checks against the checkpoint's state.
        """
        warmup = saliency_warmup(self.cfg)
        if warmup is None or self.optimizer is not None:
            return
        density, rollouts = warmup
        saliency = GradSaliency(trainable_parameters(self.model))
        for i in range(rollouts):
            step = -1 - i  # negative steps: seeds of their own, never a training step's
            problems = self.problems_at(i, seed=self.cfg.seed + 7919)
            batch, plan = self.plan_micro_batches(self.prepare_step(problems, step).batch)
            batch = self.with_fixed_logprobs(batch, plan)
            self.model.zero_grad(set_to_none=True)
            if len(batch.advantages):
                with self.policy.head_gathered():
                    policy_step(self.model, batch, self.cfg, plan, self.precision)
                saliency.accumulate()
        self.model.zero_grad(set_to_none=True)
        self._build_optimizer(masks=saliency.masks(density, scope="global"))

    # ---- one step ----------------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Training step ``step``, top to bottom; returns its metrics record (one line of metrics.jsonl)."""
        timer = self.timer = StepTimer(self.loaded.device)  # the step's seconds by part (step_timer.STEP_PARTS)
        front = self.prepare_step(self.problems_at(step), step)
        self.rest_rollout_engine()
        update = checked_update(step, self.update, front.batch, self.model)  # a NaN/inf stops the run here, step named
        self.sync_rollout_engine()
        release_free_host_memory()  # the step's freed host memory back to the OS, where little is live (memory.py)
        return self._step_record(step, front, update, timer.record())

    def prepare_step(self, problems: list[Problem], step: int) -> PreparedStep:
        """Rollout -> rewards -> advantages -> filter -> update batch of the step's ``problems`` (all ranks' prompts).

        This rank samples its share of the groups; the texts are gathered and every rank scores the whole step, so
        the rewards, advantages (``scale="batch"`` over the whole batch), filter and metrics are the step's; the update
        batch holds this rank's rows with the step's normalisers (``TrainingWorld.global_update_batch``)."""
        with self.timer.part("generation"):
            rollout = self.rollout(problems, step)
        with self.timer.part("scoring"):
            texts = self.world.gather_list(rollout.texts)
            rewards = self.scorer(texts, problems, step)
            # trajectory processing (trainer/trajectories): all-wrong groups rebuilt; everything below sees them
            rollout, texts, rewards = self.trajectories.rebuild(self, problems, rollout, texts, rewards, step)
            adv = self.trajectories.shape_advantages(compute_advantages(rewards, self.cfg))
            kept = apply_difficulty_filter(rewards, self.cfg)
            rows, groups = self.world.rows(len(texts)), self.world.rows(len(problems))
            local_kept = replace(kept, keep=kept.keep[groups])
            batch = build_update_batch(rollout, adv.advantages[rows], local_kept, self.cfg)
            batch = self.trajectories.weight_batch(self, batch, rollout)  # off-policy rows: LUFFY's shaped weight
            batch, batch_stats = self.world.global_update_batch(batch, rollout)
            tokens, truncated = self.world.sum([rollout.completion_mask.sum(), rollout.truncated.sum()])
        trajectories = self.trajectories.step_metrics()
        return PreparedStep(rollout, texts, rewards, adv, kept, batch, batch_stats, tokens, truncated, trajectories)

    def sync_rollout_engine(self) -> None:
        """Push the updated weights into an engine that holds its own copy (vLLM; the native engine samples the model
        itself), so the next rollout samples the policy just trained. Timed as the step's ``weight_sync`` part."""
        sync = getattr(self.generator, "sync_weights", None)
        if sync is not None:
            with self.timer.part("weight_sync"):
                sync(self.model)

    def rest_rollout_engine(self) -> None:
        """Let an engine that can free its memory during the update do so (vLLM's sleep mode; the next sync and rollout
        wake it)."""
        sleep = getattr(self.generator, "sleep", None)
        if sleep is not None:
            with self.timer.part("weight_sync"):  # the engine's memory moves: charged with the weight push
                sleep()

    def close(self) -> None:
        """Shut down a rollout engine that holds resources of its own (vLLM: its process groups, memory, threads).
        Under torchrun, after the run's last collective: vLLM's shutdown destroys the default process group too."""
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()

    def problems_at(self, step: int, seed: int | None = None) -> list[Problem]:
        """The training problems of step ``step`` (a seeded permutation per epoch; ``seed`` defaults to the run's)."""
        seed = self.cfg.seed if seed is None else seed
        indices = batch_indices(len(self.train_problems), self.cfg.prompts_per_step, step, seed)
        return [self.train_problems[i] for i in indices]

    def rollout(self, problems: list[Problem], step: int) -> Rollout:
        """This rank's completions of the step: ``group_size`` per prompt of its share of ``problems`` (all of them on
        one process), sampled with the step's seed (one per rank under torchrun: ``trainer/parallel/world.py``)."""
        seed = derived_seed(self.cfg.seed, "rollout", step)
        if self.world.active:
            seed = derived_seed(self.cfg.seed, "rollout", step, "rank", self.world.rank)
        prompts = [chat_prompt(self.tokenizer, p.prompt, self.cfg.system_prompt) for p in self.world.local(problems)]
        with self.policy.generation(), rollout_of_step(step):  # NaN/inf logits: DivergedSamplingError naming the step
            return self.generator.generate(
                prompts,
                n=self.cfg.group_size,
                max_new_tokens=self.cfg.max_completion_length,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                seed=seed,
            )

    def plan_micro_batches(self, batch: UpdateBatch) -> tuple[UpdateBatch, MicroBatchPlan]:
        """The update's micro-batches of ``batch``; under torchrun as many on every rank (filler micro-batches on the
        ranks with fewer: ``TrainingWorld.equal_micro_batches``), since each forward/backward holds collectives."""
        plan = plan_micro_batches_by_config(self.model, batch, self.cfg, self.prefix_sharing)
        return self.world.equal_micro_batches(batch, plan)

    def with_fixed_logprobs(self, batch: UpdateBatch, plan: MicroBatchPlan) -> UpdateBatch:
        """``batch`` with the log-probs that stay fixed through the update: the old policy's (the model before its
        first optimizer step) when num_iterations > 1, the reference model's when beta > 0; computed over the
        micro-batches of ``plan``, the update's own, so each covers the columns its micro-batch keeps."""
        if len(batch.advantages) == 0:
            return batch
        old_logp = ref_logp = None
        if self.cfg.num_iterations > 1:
            with self.timer.part("fixed_logprobs"), self.policy.head_gathered():
                old_logp = sequence_logprobs(self.model, batch.rollout, self.cfg.temperature, plan, self.precision)
        if self.ref_model is not None:
            with self.timer.part("fixed_logprobs"), self.ref.head_gathered():
                ref_logp = sequence_logprobs(self.ref_model, batch.rollout, self.cfg.temperature, plan, self.precision)
        return replace(batch, old_logp=old_logp, ref_logp=ref_logp)

    def update(self, batch: UpdateBatch) -> dict:
        """The policy update of one step: the fixed log-probs, then ``num_iterations`` optimizer steps on ``batch``,
        then one step of the learning-rate schedule. Returns the metrics of every iteration (``iteration_metrics``) and
        the micro-batch plan's (``MicroBatchPlan.metrics``: one pass over the batch)."""
        if self.optimizer is None:
            raise RuntimeError(
                f"Trainer.update: mask_source={self.cfg.mask_source!r} needs warm_up_masks() before the first update "
                "(train() calls it)"
            )
        batch, plan = self.plan_micro_batches(batch)
        batch = self.with_fixed_logprobs(batch, plan)
        iterations = []
        for _ in range(self.cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            if len(batch.advantages):  # else nothing can contribute a gradient this step
                iterations.append(self._optimizer_step(batch, plan))
        self._schedule_step(stepped=bool(iterations))
        return {**iteration_metrics(iterations), **self.world.reduce_plan_metrics(plan.metrics())}

    def _optimizer_step(self, batch: UpdateBatch, plan: MicroBatchPlan) -> dict:
        # FSDP: the whole LM-head weight for the fused ops, for this block only
        with self.timer.part("forward_backward"), self.policy.head_gathered():
            out = self.world.reduce_update_metrics(policy_step(self.model, batch, self.cfg, plan, self.precision))
        with self.timer.part("optimizer"):
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip else float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP: a DTensor (the global norm, over every rank's shards)
                norm = norm.full_tensor()
            if not torch.isfinite(norm):
                raise FloatingPointError(f"the gradient norm is {float(norm)}; refusing to step on garbage")
            out["grad_norm"] = float(norm)
            self.optimizer.step()
        return out

    def _schedule_step(self, stepped: bool) -> None:
        if stepped:
            self.scheduler.step()
            return
        with warnings.catch_warnings():  # the schedule counts steps, not updates; torch warns when it advances alone
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def evaluate(self) -> EvalResult:
        """The held-out evaluation of the model as it is now (``evaluation_kwargs``: the same samples' seeds each time,
        so evaluations of one run are paired by problem and sample)."""
        with self.policy.generation():
            return evaluate(
                self.generator,
                self.tokenizer,
                self.eval_problems,
                **evaluation_kwargs(self.cfg),
                rank=self.world.rank,
                world_size=self.world.world_size,
                gather=self.world.gather_dict,
            )

    # ---- phase 3: the run --------------------------------------------------------------------------------------------

    def train(self, before_eval: dict | None = None) -> RunResult:
        """Train and evaluate. ``before_eval``: the base model's evaluation computed elsewhere with the same
        ``evaluation_kwargs`` and problems (e.g. shared by the arms of a study), used instead of evaluating again;
        ignored on resume (the checkpoint holds the run's own). The output folder's lock (taken by preflight,
        ``run_lock``) is released when it returns or raises."""
        try:
            return self._train(before_eval)
        finally:
            release_run_lock(self.cfg.output_dir)

    def _train(self, before_eval: dict | None) -> RunResult:
        cfg = self.cfg
        self.warm_up_masks()
        start, before = 0, (eval_dict_from_json(before_eval) if before_eval is not None else None)
        if cfg.resume:
            start, before = self._load_latest_checkpoint()
            self.sync_rollout_engine()  # the engine was built from the weights before the checkpoint loaded
        main = self.world.is_main  # only rank 0 writes files and shows progress
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        log = MetricsLog(metrics_path, resume_step=start if cfg.resume else None) if main else MemoryLog()
        if before is None:
            before = self.evaluate().to_dict()
        if not cfg.resume and main:
            with open(os.path.join(cfg.output_dir, "eval_before.json"), "w") as f:
                json.dump(before, f, indent=1)
            print(f"before training: pass@1 {before['pass_at_k'][1]['mean']:.3f}")

        progress = Progress(cfg.steps, start, cfg.progress and main)
        steps_done = start
        for step in range(start, cfg.steps):
            record = self.train_step(step)
            self.completions_sampled += record["completions_sampled"]
            record["completions_sampled_total"] = self.completions_sampled
            log.write(record)
            progress.update(record)
            steps_done = step + 1
            spent = cfg.rollout_budget is not None and self.completions_sampled >= cfg.rollout_budget
            last = step + 1 == cfg.steps or spent
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                log.write({"step": step, "eval": self.evaluate().to_dict()})
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last:
                self._save_checkpoint(step + 1, before)
            if spent:  # the generation budget is used up (RLVRConfig.rollout_budget)
                break
        progress.close()

        after = self.evaluate().to_dict()
        metrics = log.read()
        rows = before_after_rows(before, after)
        if main:
            with open(os.path.join(cfg.output_dir, "eval_after.json"), "w") as f:
                json.dump(after, f, indent=1)
            extra = {
                "steps": steps_done,  # fewer than cfg.steps where rollout_budget ended the run
                "completions_sampled": self.completions_sampled,
                "peak_memory_bytes": peak_memory_bytes(self.loaded.device),
                **self.precision.record(),  # the resolved RLVRConfig.dtype: weights, compute dtype, why
                "rollout_engine": self.rollout_engine,  # the resolved RLVRConfig.rollout_engine
            }
            write_report(cfg.output_dir, cfg.to_dict(), before, after, metrics, extra)
        return RunResult(cfg.output_dir, before, after, metrics, table(rows))

    def _load_latest_checkpoint(self) -> tuple[int, dict]:
        """Restore model, optimizer, schedule and RNG from the checkpoint that preflight verified (the newest good one):
        (its step, the evaluation before). Under torchrun each rank restores its own shards and RNG state."""
        if self.world.active:
            state = load_sharded_checkpoint(self.resume_point.path, self.policy, self.optimizer)
        else:
            state = load_checkpoint(self.resume_point.path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.trajectories.load_state_dict(state.get("trajectories"))  # the replay store as it was
        self.completions_sampled = int(state.get("completions_sampled", 0))  # toward rollout_budget
        return state["step"], eval_dict_from_json(state["before_eval"])

    def _save_checkpoint(self, step: int, before: dict) -> None:
        """The checkpoint after ``step`` steps: one process writes safetensors; under torchrun every rank writes its
        own shards through torch.distributed.checkpoint and rank 0 commits the folder once all have
        (``trainer/checkpoint/sharded.py``). Either way it is complete and verified when this returns."""
        trainer_state = {
            "scheduler": self.scheduler.state_dict(),
            "before_eval": before,
            "config": self.cfg.to_dict(),
            "completions_sampled": self.completions_sampled,
        }
        if self.trajectories.active:
            trainer_state["trajectories"] = self.trajectories.state_dict()
        if self.world.active:
            trainer_state["parallel"] = self.world.mode
            # a DDP adapter run also writes its (replicated) adapter in PEFT's format, for PeftModel.from_pretrained
            extra = (lambda folder: write_peft_adapter(folder, self.adapter)) if self.adapter is not None else None
            save_sharded_checkpoint(self.cfg.output_dir, step, self.policy, self.optimizer, trainer_state, extra)
        elif self.adapter is not None:  # the adapter in PEFT's format, not the frozen base (adapters/checkpoint.py)
            save_adapter_checkpoint(self.cfg.output_dir, step, self.adapter, self.optimizer, trainer_state)
        else:
            save_checkpoint(self.cfg.output_dir, step, self.model, self.optimizer, trainer_state)

    def _floors(self, front: PreparedStep, update: dict, times: dict[str, float]) -> dict:
        """Each part of the step as a fraction of its floor (reporting/floor.py), for this rank's share."""
        world = self.world.world_size
        rollout = front.rollout
        prompts = rollout.prompt_mask[:: self.cfg.group_size] if self.prefix_sharing else rollout.prompt_mask
        steps = len(update["iterations"]) if "iterations" in update else int("loss" in update)
        work = StepWork(
            prefill_positions=float(prompts.sum()),
            sampled_tokens=float(rollout.completion_mask.sum()),
            decode_steps=int(rollout.completion_ids.shape[1]),
            update_positions=update.get("decoder_tokens", 0) / world,
            update_rows=update.get("tokens_updated", 0.0) / world,
            micro_batches=int(update.get("micro_batches", 0)) if steps else 0,
            fixed_passes=(int(self.cfg.num_iterations > 1) + int(self.ref_model is not None)) if steps else 0,
            optimizer_steps=steps,
            recompute=self.recomputes,
        )
        moved = optimizer_bytes(self.cfg.optimizer, self.optimizer, self.model, steps)
        if self.world.mode == "fsdp":  # each rank updates its shards
            moved /= world
        ceilings = ceilings_for(self.loaded.device, self.compute_dtype)  # measured at the first step of the process
        return floor_record(part_costs(work, self.model_work), moved, times, ceilings)

    def _step_record(self, step: int, front: PreparedStep, update: dict, times: dict[str, float]) -> dict:
        rewards, adv, kept, batch = front.rewards, front.adv, front.kept, front.batch_stats
        completion_tokens = front.completion_tokens
        record = {
            "step": step,
            "lr": self.scheduler.get_last_lr()[0],
            "reward_mean": float(rewards.total.mean()),
            "reward_std": float(rewards.total.std()) if rewards.total.numel() > 1 else 0.0,
            "solve_rate": float(rewards.correct.float().mean()),
            "reward_modes": {name: float(np.mean(v)) for name, v in rewards.components.items()},
            "reward_errors": rewards.errors,
            "advantage_mean": float(adv.advantages.mean()),
            "advantage_abs_mean": float(adv.advantages.abs().mean()),
            "all_equal_groups": int(adv.all_equal.sum()),
            "groups_filtered": kept.removed,
            "completions_updated": batch["completions_updated"],
            "zero_advantage_completions_skipped": batch["skipped_rows"],
            "zero_advantage_tokens_skipped": batch["skipped_tokens"],
            "truncated_frac": front.truncated / len(front.texts),
            "completion_tokens": completion_tokens,
            # every completion sampled this step, lesson re-samples included (what rollout_budget counts)
            "completions_sampled": len(front.texts) + front.trajectories.get("traj_lesson_samples", 0),
            "tokens_per_s": completion_tokens / times["seconds"],
            **times,  # seconds, and time_<part>_s for each part of the step (step_timer), which sum to it
            "peak_memory_bytes": peak_memory_bytes(self.loaded.device),
            **self._floors(front, update, times),
        }
        if self.world.active:
            record["world_size"] = self.world.world_size
            record["parallel"] = self.world.mode
        if self.cfg.format_classes:  # format frequency of this step's rollouts, and each format's accuracy
            stats = format_frequency(front.texts, self.cfg.format_classes, correct=rewards.correct.tolist())
            record["formats"] = {name: asdict(s) for name, s in stats.items()}
        record.update(front.trajectories)  # trajectory processing's metrics (none with trajectory_processing=off)
        record.update(update)
        return record


def train(cfg: RLVRConfig) -> RunResult:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
