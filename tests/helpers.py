"""Small tensor builders for unit tests (no files)."""

from __future__ import annotations

import torch

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
