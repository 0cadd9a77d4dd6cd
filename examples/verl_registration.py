"""rlvr_fast inside verl 0.9.1: register, then use the names from verl's config (runs on the CPU in seconds).

    pip install --no-deps verl==0.9.1 && pip install -r requirements-verl.txt
    python examples/verl_registration.py

In a verl run nothing here is needed but the registration in every verl process and the config keys:

    VERL_USE_EXTERNAL_MODULES=rlvr_fast.integrations.verl.plugin python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=rlvr_fast_nsr \\
        actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_fast ...

This script calls the registered functions exactly as verl does (verl's ``compute_advantage`` and actor loss look them
up by name in the same registries) on a small batch, next to verl's own GRPO and PPO loss.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos
from verl.utils.experimental.torch_functional import FusedLinearForPPO
from verl.workers.config import ActorConfig

from rlvr_fast.integrations.verl import disable_fused_linear_logprobs, register


def main() -> None:
    registration = register()
    print(f"verl {registration.verl_version}: registered {len(registration.adv_estimators)} advantage estimators")
    print("  algorithm.adv_estimator=" + " | ".join(registration.adv_estimators[:6]) + " | ...")
    print(f"  actor_rollout_ref.actor.policy_loss.loss_mode={registration.policy_loss}")

    # 3 prompts x 4 completions, shuffled as verl's batch may be; the reward sits on the last response token
    torch.manual_seed(0)
    uids = np.array(["p0", "p1", "p2"] * 4, dtype=object)[np.random.default_rng(0).permutation(12)]
    lengths = torch.randint(2, 7, (12,))
    response_mask = (torch.arange(6) < lengths.unsqueeze(1)).float()
    token_level_rewards = torch.zeros(12, 6)
    token_level_rewards[torch.arange(12), lengths - 1] = torch.randint(0, 2, (12,)).float()
    algorithm = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "rlvr_fast": {"lam": 0.1}})

    def advantages(name: str) -> torch.Tensor:  # the keywords verl's ray_trainer.compute_advantage passes
        fn = core_algos.get_adv_estimator_fn(name)
        adv, _ = fn(token_level_rewards=token_level_rewards, response_mask=response_mask, config=algorithm, index=uids)
        return adv

    verl_grpo, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards, response_mask, uids)
    ours = advantages("rlvr_fast_grpo")
    print(f"rlvr_fast_grpo: max |ours - verl's grpo| = {(ours - verl_grpo).abs().max().item():.2e}")
    for name in ("rlvr_fast_nsr", "rlvr_fast_w_reinforce", "rlvr_fast_grpo_negative_only"):
        print(f"{name}: per-completion advantages {[round(a, 4) for a in advantages(name)[:, 0].tolist()]}")

    # the actor's policy loss, as verl's actor calls the function registered under loss_mode
    actor = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=4, clip_ratio_high=0.28)
    old_log_prob = -torch.rand(12, 6) * 2
    log_prob = (old_log_prob + 0.2 * torch.randn(12, 6)).requires_grad_(True)
    for loss_mode in ("vanilla", registration.policy_loss):
        loss, metrics = core_algos.get_policy_loss_fn(loss_mode)(
            old_log_prob, log_prob, ours, response_mask, loss_agg_mode="seq-mean-token-mean", config=actor
        )
        print(f"policy loss {loss_mode!r}: {loss.item():.6f}  {metrics}")

    # actor_rollout_ref.model.use_fused_kernels=True: verl's fused log-probs answered by rlvr_fast.token_logprobs
    hidden, lm_head = torch.randn(2, 5, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 5))
    verl_logp, _ = FusedLinearForPPO()(hidden, lm_head, labels, 0.8)
    register(fused_linear_logprobs=True)
    our_logp, _ = FusedLinearForPPO()(hidden, lm_head, labels, 0.8)
    disable_fused_linear_logprobs()
    print(f"fused log-probs: max |ours - verl's| = {(our_logp - verl_logp).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
