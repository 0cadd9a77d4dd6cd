"""The stock-versus-patched GRPOTrainer harness of tests/integrations: the prompts, reward functions and config of
the tiny runs, a callback recording gradients and micro-batch losses, and generation recorded on the stock run and
replayed on the patched one. Imported only after ``pytest.importorskip("trl")``."""

from __future__ import annotations

import copy

import torch
from transformers import TrainerCallback
from trl import GRPOConfig

from rlvr_fast.integrations.trl import trl_reward_func

# Tokens that end a completion besides <eos>: with ~100 near-uniform tokens, about one draw in five stops, so
# completions have different lengths (padding, per-sequence normalisers) and some are truncated (mask_truncated).
STOP_TOKENS = ["<eos>", *"0123456789abcdefghij"]
PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (2, 5)]]


def char_sum_reward(prompts, completions, **kwargs):
    """A deterministic reward with many levels, so a group's rewards are rarely all equal."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def length_parity(prompts, completions, completion_ids, **kwargs):
    """1 when the completion has an odd number of tokens: a verdict the test can recompute from completion_mask."""
    return [float(len(ids) % 2) for ids in completion_ids]


def reward_funcs():
    return [trl_reward_func("random", answer_column=None, gamma=0.5, seed=3), char_sum_reward]


def grpo_config(tmp_path, seed, **overrides) -> GRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=0.01,
        optim="sgd",  # plain SGD: the step is the gradient, nothing else accumulates differences
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        reward_weights=[1.0, 0.5],
    )
    values.update(overrides)
    return GRPOConfig(**values)


class Recorder(TrainerCallback):
    """Gradients before each optimizer step, and the loss and inputs of every micro-batch."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.advantages: list[torch.Tensor] = []
        self.completion_mask: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def attach(self, trainer):
        compute_loss = trainer.compute_loss

        def recorded(model, inputs, *args, **kwargs):
            loss = compute_loss(model, inputs, *args, **kwargs)
            self.losses.append(loss.detach().clone())
            self.advantages.append(inputs["advantages"].detach().clone())
            self.completion_mask.append(inputs["completion_mask"].detach().clone())
            return loss

        trainer.compute_loss = recorded


def record_or_replay_generation(trainer, rollouts: list | None) -> list:
    """Stock run (rollouts None): record each ``_generate`` output and the RNG state after it. Patched run: return
    the recorded outputs and restore the RNG state, so both runs see the same rollouts and the same random stream."""
    generate = trainer._generate
    recorded: list = []

    def record(prompts):
        out = generate(prompts)
        recorded.append((copy.deepcopy(out), torch.get_rng_state()))
        return out

    def replay(prompts):
        out, state = rollouts.pop(0)
        torch.set_rng_state(state)
        return copy.deepcopy(out)

    trainer._generate = record if rollouts is None else replay
    return recorded
