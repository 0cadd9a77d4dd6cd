"""LUFFY's shaped importance weight for off-policy rows, and how it enters the existing loss (through the mask).

LUFFY (Yan et al. 2025, "Learning to Reason under Off-Policy Guidance", arXiv:2504.14945, "policy
shaping via regularized importance sampling") replaces the clipped ratio of an off-policy token by

    f(r) = r / (r + gamma),    r = pi_theta(y_t | x, y_<t) / pi_b(y_t | x, y_<t),    gamma = 0.1,  no clipping,

and maximises f(r) * A. LUFFY sets pi_b = 1 (its demonstrations come from another model); here pi_b is the policy
that actually sampled the row (the trainer's own policy at the step it was sampled, at the run's temperature), so r is
a true importance ratio. The gradient of f(r_theta) * A is

    f'(r) r A grad log pi_theta = gamma r / (r + gamma)^2 A grad log pi_theta = f (1 - f) A grad log pi_theta,

with f = sigmoid(log r - log gamma) (overflow-free). The step's loss (``ops.fused_linear_grpo_loss``, one optimizer
step per rollout, ``num_iterations`` = 1) has ratio rho = exp(logp - logp.detach()) = 1 at every token, so no clip is
active and each token's gradient is -m_bt A grad log pi_theta for its mask weight m_bt. Multiplying an off-policy
token's mask weight by c_bt = f (1 - f) (r computed from the current policy, a constant) gives exactly the gradient of
-f(r) A: LUFFY's shaped, unclipped objective. The normaliser is the step's unweighted token count (dapo) or
B * max_completion_length (dr_grpo), fixed before the weights are applied, so the weights do not cancel.
"""

from __future__ import annotations

import math

import torch


def shaped_weight(log_ratio: torch.Tensor, gamma: float) -> torch.Tensor:
    """f(r) = r / (r + gamma) for r = exp(log_ratio), computed as sigmoid(log_ratio - log gamma)."""
    return torch.sigmoid(log_ratio - math.log(gamma))


def shaped_gradient_coefficient(log_ratio: torch.Tensor, gamma: float) -> torch.Tensor:
    """f'(r) r = gamma r / (r + gamma)^2 = f (1 - f): the factor on a token's mask weight (module doc)."""
    u = log_ratio - math.log(gamma)
    return torch.sigmoid(u) * torch.sigmoid(-u)
