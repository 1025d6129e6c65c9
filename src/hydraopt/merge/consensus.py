"""Consensus steps: how K (sparsified, weighted) task tensors become one.

Stacked as (..., K, n) with the task axis second to last.
"""

from __future__ import annotations

import torch

# torch-free, beside the configs
from hydraopt.merge.choices import Consensus as Consensus
from hydraopt.merge.choices import MajoritySign as MajoritySign


def majority_sign_mask(tensors: torch.Tensor, method: MajoritySign = "total") -> torch.Tensor:
    """True where a task's sign agrees with the elected sign (TIES "elect").

    ``total`` elects the sign of the summed values, ``frequency`` the most common sign; ties go
    to +, as in PEFT's ``calculate_majority_sign_mask``.
    """
    sign = tensors.sign()
    votes = tensors.sum(dim=-2) if method == "total" else sign.sum(dim=-2)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return sign == elected.unsqueeze(-2)


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks that agree with the elected sign (TIES "disjoint merge")."""
    kept = (weighted * mask).sum(dim=-2)
    count = mask.sum(dim=-2).clamp_min(1)
    return kept / count


def combine(
    pruned: torch.Tensor,
    weights: torch.Tensor,
    method: Consensus,
    majority_sign_method: MajoritySign = "total",
) -> torch.Tensor:
    """Combine (..., K, n) task tensors with per-task weights (..., K).

    The sign election uses the *unweighted* pruned tensors, as PEFT's ``ties`` does.
    """
    weighted = pruned * weights.unsqueeze(-1)
    if method == "sum":
        return weighted.sum(dim=-2)
    return disjoint_mean(weighted, majority_sign_mask(pruned, majority_sign_method))
