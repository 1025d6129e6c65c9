"""Small tensor builders and reference calls for unit tests (no files)."""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from hydraopt.types import LoraStack


def random_stack(
    G: int = 2,
    K: int = 3,
    d: int = 6,
    k: int = 5,
    r: int = 2,
    *,
    seed: int = 0,
    shared_a: bool = False,
) -> LoraStack:
    gen = torch.Generator().manual_seed(seed)
    if shared_a:
        A = torch.randn(G, 1, r, k, generator=gen).expand(G, K, r, k).clone()
    else:
        A = torch.randn(G, K, r, k, generator=gen)
    B = torch.randn(G, K, d, r, generator=gen)
    scale = torch.rand(G, K, generator=gen) + 0.5
    return LoraStack(A=A, B=B, scale=scale)


def peft_merge(
    name: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign: str
) -> torch.Tensor:
    """PEFT's merge_utils function for ``name`` (the same dispatch as add_weighted_adapter's)."""
    if name == "task_arithmetic":
        return merge_utils.task_arithmetic(tensors, weights)
    if name == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    if name == "ties":
        return merge_utils.ties(tensors, weights, density, sign)
    if name == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    return merge_utils.dare_ties(tensors, weights, density, sign)
