"""Least-squares magnitudes of the heads, for solutions refined on the cosine distance.

The cosine distance ignores magnitude, so a solution refined on it is only right up to a positive
factor per head — and the deployed update is ΔW' itself, magnitude included. Every kind's merged
update is linear in its head, so one factor per head fixes it and leaves every cosine unchanged.
"""

from __future__ import annotations

import torch


def head_scale_factors(
    delta: torch.Tensor, approx: torch.Tensor, routing: torch.Tensor
) -> torch.Tensor:
    """alpha_c = sum_{i -> c} <ΔW_i, ΔW'_c> / (n_c ||ΔW'_c||²), the Frobenius-best magnitude.

    Args:
        delta: (G, K, d, k) the original updates; approx: (G, M, d, k) each head's ΔW'_c;
            routing: (G, K).

    Returns:
        alpha (G, M); 1 for a head no task is routed to.
    """
    M = approx.shape[1]
    onehot = torch.nn.functional.one_hot(routing, M).to(delta.dtype)  # (G, K, M)
    inner = torch.einsum("gkdx,gmdx->gkm", delta, approx)  # <ΔW_i, ΔW'_c>
    num = (inner * onehot).sum(1)  # (G, M)
    den = onehot.sum(1) * approx.square().sum(dim=(2, 3))  # (G, M)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))


def fit_head_scales(
    delta: torch.Tensor, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor
) -> torch.Tensor:
    """Rescale each LoRA head B'_c by its :func:`head_scale_factors` (ΔW'_c = B'_c A').

    Returns:
        heads (G, M, d, r) rescaled.
    """
    alpha = head_scale_factors(delta, heads @ a[:, None], routing)  # (G, M)
    return heads * alpha[:, :, None, None]
