"""The paper's equations (design.md §1, §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] sum of log p(chosen response | prompt) under the policy
    policy_rejected_logps: torch.Tensor,  # [B]
    ref_chosen_logps: torch.Tensor,  # [B] the same under the frozen reference
    ref_rejected_logps: torch.Tensor,  # [B]
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: L = -log sigmoid(beta * ((pc - rc) - (pr - rr))), averaged over the batch.

    Returns (loss scalar, chosen_rewards [B], rejected_rewards [B]) with rewards beta * (p - r),
    detached as they are for logging only.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
