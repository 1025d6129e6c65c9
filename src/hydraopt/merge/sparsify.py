"""Sparsification steps of TIES / DARE, on task tensors stacked as (..., K, n).

Same semantics as PEFT's ``magnitude_based_pruning`` and ``random_pruning`` (per task tensor),
but batched over modules and drawing randomness from an explicit generator.
"""

from __future__ import annotations

import torch

from hydraopt.merge.choices import Sparsify as Sparsify  # torch-free, beside the configs


def magnitude_prune(tensors: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * n) largest-magnitude entries of each task tensor (last axis)."""
    n = tensors.shape[-1]
    keep = int(density * n)
    if density >= 1:
        return tensors
    top = tensors.abs().topk(keep, dim=-1).indices
    mask = torch.zeros_like(tensors).scatter_(-1, top, 1.0)
    return tensors * mask


def random_prune(
    tensors: torch.Tensor, density: float, *, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, rescale survivors by 1/density."""
    if density >= 1:
        return tensors
    mask = torch.bernoulli(torch.full_like(tensors, density), generator=generator)
    pruned = tensors * mask
    return pruned / density if rescale else pruned


def sparsify(
    tensors: torch.Tensor, method: Sparsify, density: float, generator: torch.Generator
) -> torch.Tensor:
    """Apply the named sparsification (``none`` returns the input)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if method == "none":
        return tensors
    if method == "magnitude":
        return magnitude_prune(tensors, density)
    return random_prune(tensors, density, rescale=True, generator=generator)
