"""Adapters that put rlvr_fast's fused ops inside existing trainers.

- ``rlvr_fast.integrations.trl``: ``RLVRFastGRPOTrainer`` / ``patch_grpo_trainer`` for TRL's GRPOTrainer (needs the
  ``trl`` extra; imported on demand so that ``rlvr_fast`` never imports TRL by itself).
- ``rlvr_fast.integrations.policy_loss``: ``hidden_state_policy_loss``, the one loss call every adapter makes (usable
  directly from any trainer that has the last hidden states and the LM head).
"""

from rlvr_fast.integrations.policy_loss import hidden_state_policy_loss
from rlvr_fast.ops.objective import PolicyObjective

__all__ = ["PolicyObjective", "hidden_state_policy_loss"]
