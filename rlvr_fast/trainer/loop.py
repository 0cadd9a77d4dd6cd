"""The training loop, top to bottom: rollout -> score -> filter -> advantage -> loss -> update -> log / checkpoint.

Each step samples G completions for each of ``prompts_per_step`` prompts, scores them with the configured reward
modes, computes group advantages with the fused op, drops filtered groups and (when beta == 0) zero-advantage
completions, and updates the policy ``num_iterations`` times from its last hidden states through the fused loss.
Everything random is seeded per step from the run's seed, so ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rlvr_fast.eval import format_frequency
from rlvr_fast.trainer.checkpoint import load_checkpoint, save_checkpoint
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.data import Problem, batch_indices, chat_prompt, load_problems
from rlvr_fast.trainer.evaluation import EvalResult, evaluate, evaluation_kwargs
from rlvr_fast.trainer.finite_guard import checked_update
from rlvr_fast.trainer.generation import HFGeneration, Rollout
from rlvr_fast.trainer.memory import enable_activation_checkpointing, return_freed_host_memory
from rlvr_fast.trainer.model import LoadedModel, load_model
from rlvr_fast.trainer.optimizers import build_optimizer
from rlvr_fast.trainer.policy import UpdateBatch, policy_step, sequence_logprobs
from rlvr_fast.trainer.preflight import preflight
from rlvr_fast.trainer.report import before_after_rows, table, write_report
from rlvr_fast.trainer.run_log import MetricsLog, Progress, peak_memory_bytes
from rlvr_fast.trainer.schedule import build_scheduler
from rlvr_fast.trainer.scoring import Scorer, Scores
from rlvr_fast.trainer.seeds import derived_seed


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
    def __init__(self, cfg: RLVRConfig, loaded: LoadedModel | None = None):
        self.cfg = cfg.validate()
        seed_everything(cfg.seed)
        self.scorer = Scorer(cfg)  # checks reward modes before the model loads
        self.train_problems, self.eval_problems = load_problems(cfg)
        self.resume_point = preflight(cfg, check_model=loaded is None)  # output folder, resume checks: before loading
        self.loaded = loaded or load_model(cfg)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        checkpointing = cfg.gradient_checkpointing
        if checkpointing if checkpointing is not None else self.loaded.device.type == "cuda":
            enable_activation_checkpointing(self.model)
        if self.loaded.device.type == "cpu":
            return_freed_host_memory()
        self.generator = HFGeneration(self.model, self.tokenizer, cfg.max_prompt_length)
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = build_optimizer(cfg, self.model, warmup=self._grad_warmup)
        self.scheduler = build_scheduler(
            self.optimizer, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps
        )
        os.makedirs(cfg.output_dir, exist_ok=True)

    # ---- one step's pieces ------------------------------------------------------------------------------------------

    def rollout(self, problems: list[Problem], step: int) -> Rollout:
        prompts = [chat_prompt(self.tokenizer, p.prompt, self.cfg.system_prompt) for p in problems]
        return self.generator.generate(
            prompts,
            n=self.cfg.group_size,
            max_new_tokens=self.cfg.max_completion_length,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            seed=derived_seed(self.cfg.seed, "rollout", step),
        )

    def update_batch(self, rollout: Rollout, scores: Scores) -> UpdateBatch:
        """The completions that run through the model, and the normaliser of the whole step."""
        cfg = self.cfg
        loss_mask = rollout.completion_mask.float()
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * (~rollout.truncated).float()[:, None]
        kept = scores.filtered.completion_mask(cfg.group_size).to(loss_mask.device)
        adv = scores.advantages.advantages.to(loss_mask.device)
        counted = kept & (loss_mask.sum(dim=1) > 0)  # completions with tokens in the loss
        runs = counted & ((adv != 0) | (cfg.beta > 0))
        skipped = counted & ~runs  # zero advantage, beta == 0: no gradient, so no forward either
        rows = runs.nonzero().squeeze(1)
        batch = UpdateBatch(
            rollout=rollout.select(rows),
            advantages=adv[rows],
            loss_mask=loss_mask[rows],
            step_rows=int(kept.sum()),
            step_tokens=float(loss_mask[kept].sum()),
            skipped_rows=int(skipped.sum()),
            skipped_tokens=float(loss_mask[skipped].sum()),
        )
        if len(rows) and cfg.num_iterations > 1:
            batch.old_logp = sequence_logprobs(self.model, batch.rollout, cfg.temperature)
        if len(rows) and self.ref_model is not None:
            batch.ref_logp = sequence_logprobs(self.ref_model, batch.rollout, cfg.temperature)
        return batch

    def update(self, batch: UpdateBatch) -> dict:
        cfg = self.cfg
        out: dict = {}
        stepped = False
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            if len(batch.advantages) == 0:
                continue  # nothing can contribute a gradient this step
            out = policy_step(self.model, batch, cfg)
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
            if not torch.isfinite(norm):
                raise FloatingPointError(f"the gradient norm is {float(norm)}; refusing to step on garbage")
            out["grad_norm"] = float(norm)
            self.optimizer.step()
            stepped = True
        if stepped:
            self.scheduler.step()
        else:  # the schedule counts steps, not updates; torch warns when it advances without an optimizer step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        return out

    def _grad_warmup(self, saliency, rollouts: int) -> None:
        """Warm-up rollouts for a gradient-saliency mask: gradients only, no step (they are not training steps)."""
        for i in range(rollouts):
            problems = [
                self.train_problems[j]
                for j in batch_indices(len(self.train_problems), self.cfg.prompts_per_step, i, self.cfg.seed + 7919)
            ]
            rollout = self.rollout(problems, step=-1 - i)
            scores = self.scorer(rollout.texts, problems, step=-1 - i)
            batch = self.update_batch(rollout, scores)
            self.model.zero_grad(set_to_none=True)
            if len(batch.advantages):
                policy_step(self.model, batch, self.cfg)
                saliency.accumulate()
        self.model.zero_grad(set_to_none=True)

    def evaluate(self, tag: str) -> EvalResult:
        return evaluate(self.generator, self.tokenizer, self.eval_problems, **evaluation_kwargs(self.cfg))

    # ---- the loop -----------------------------------------------------------------------------------------------

    def train(self, before_eval: dict | None = None) -> RunResult:
        """Train and evaluate. ``before_eval``: the base model's evaluation computed elsewhere with the same
        ``evaluation_kwargs`` and problems (e.g. shared by the arms of a study), used instead of evaluating again;
        ignored on resume (the checkpoint holds the run's own)."""
        cfg = self.cfg
        start, before = 0, (EvalResult.from_json(before_eval) if before_eval is not None else None)
        if cfg.resume:
            state = load_checkpoint(self.resume_point.path, self.model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            start, before = state["step"], EvalResult.from_json(state["before_eval"])
        log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=start if cfg.resume else None)
        if before is None:
            before = self.evaluate("before").to_dict()
        if not cfg.resume:
            with open(os.path.join(cfg.output_dir, "eval_before.json"), "w") as f:
                json.dump(before, f, indent=1)
            print(f"before training: pass@1 {before['pass_at_k'][1]['mean']:.3f}")

        progress = Progress(cfg.steps, start, cfg.progress)
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            problems = [
                self.train_problems[i]
                for i in batch_indices(len(self.train_problems), cfg.prompts_per_step, step, cfg.seed)
            ]
            rollout = self.rollout(problems, step)
            t_gen = time.perf_counter() - t0
            scores = self.scorer(rollout.texts, problems, step)
            batch = self.update_batch(rollout, scores)
            upd = checked_update(step, self.update, batch, self.model)  # NaN/inf stops here, step named
            elapsed = time.perf_counter() - t0
            record = self._step_record(step, rollout, scores, batch, upd, elapsed, t_gen)
            log.write(record)
            progress.update(record["reward_mean"], record["tokens_per_s"])
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                log.write({"step": step, "eval": self.evaluate(f"step{step + 1}").to_dict()})
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == cfg.steps:
                save_checkpoint(
                    cfg.output_dir,
                    step + 1,
                    self.model,
                    self.optimizer,
                    {"scheduler": self.scheduler.state_dict(), "before_eval": before, "config": cfg.to_dict()},
                )
        progress.close()

        after = self.evaluate("after").to_dict()
        with open(os.path.join(cfg.output_dir, "eval_after.json"), "w") as f:
            json.dump(after, f, indent=1)
        metrics = log.read()
        rows = before_after_rows(before, after)
        extra = {"steps": cfg.steps, "peak_memory_bytes": peak_memory_bytes(self.loaded.device)}
        write_report(cfg.output_dir, cfg.to_dict(), before, after, metrics, extra)
        return RunResult(cfg.output_dir, before, after, metrics, table(rows))

    def _step_record(self, step, rollout, scores, batch, upd, elapsed, t_gen) -> dict:
        cfg = self.cfg
        adv = scores.advantages
        completion_tokens = float(rollout.completion_mask.sum())
        record = {
            "step": step,
            "lr": self.scheduler.get_last_lr()[0],
            "reward_mean": float(scores.rewards.mean()),
            "reward_std": float(scores.rewards.std()) if scores.rewards.numel() > 1 else 0.0,
            "solve_rate": float(scores.correct.float().mean()),
            "reward_modes": {name: float(np.mean(v)) for name, v in scores.components.items()},
            "reward_errors": scores.reward_errors,
            "advantage_mean": float(adv.advantages.mean()),
            "advantage_abs_mean": float(adv.advantages.abs().mean()),
            "all_equal_groups": int(adv.all_equal.sum()),
            "groups_filtered": scores.filtered.removed,
            "completions_updated": len(batch.advantages),
            "zero_advantage_completions_skipped": batch.skipped_rows,
            "zero_advantage_tokens_skipped": batch.skipped_tokens,
            "truncated_frac": float(rollout.truncated.float().mean()),
            "completion_tokens": completion_tokens,
            "tokens_per_s": completion_tokens / elapsed,
            "seconds": elapsed,
            "generation_seconds": t_gen,
            "peak_memory_bytes": peak_memory_bytes(self.loaded.device),
        }
        if cfg.format_classes:  # format frequency of this step's rollouts, and each format's accuracy
            stats = format_frequency(rollout.texts, cfg.format_classes, correct=scores.correct.tolist())
            record["formats"] = {name: asdict(s) for name, s in stats.items()}
        record.update(upd)
        return record


def train(cfg: RLVRConfig) -> RunResult:
    return Trainer(cfg).train()
