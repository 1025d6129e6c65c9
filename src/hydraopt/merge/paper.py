"""The paper-faithful HydraOpt optimisation (Eq. 1-2, Algorithm 1, appendix Figs. 7-9).

AdamW (lr 0.01, weight decay 0.01 as torch's default) for ``epochs`` full-batch steps on

    loss = 1/(K J) sum_modules sum_i f(ΔW_i, sum_j softmax(C'_i / T)_j B'_j A')      (M < K)
    loss = 1/(K J) sum_modules sum_i f(ΔW_i, B'_i A')                                 (M = K)

with J the number of factor tensors (2 per module). A' starts kaiming-uniform(a=sqrt(5)), B' at
zero, C' Gaussian. After training each task takes head argmax_j C'_ij, per module.

Temperature convention: the paper's text writes softmax(C'/T) while its appendix code multiplies
by T (T = 5). We use the text's form, softmax(C'/T), so our default T = 0.2 equals the code's 5.

Modules do not share parameters, so batching G same-shaped modules into one loss gives every
module exactly the gradient it gets from the paper's single global loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hydraopt.merge.distances import get_distance


def init_params(
    G: int, K: int, M: int, d: int, r: int, k: int, *, generator: torch.Generator, device, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A' (G, r, k) kaiming-uniform(a=sqrt(5)) like nn.Linear, B' (G, M, d, r) zeros, C' (G, K, M)."""
    bound = math.sqrt(6.0 / ((1 + 5.0) * k))  # kaiming_uniform_ gain for a = sqrt(5), fan_in = k
    a = (torch.rand(G, r, k, generator=generator, device=device, dtype=dtype) * 2 - 1) * bound
    b = torch.zeros(G, M, d, r, device=device, dtype=dtype)
    c = None if M == K else torch.randn(G, K, M, generator=generator, device=device, dtype=dtype)
    return a, b, c


def paper_solve(
    delta: torch.Tensor,
    rank: int,
    num_heads: int,
    *,
    distance: str,
    epochs: int,
    lr: float,
    weight_decay: float,
    temperature: float,
    num_factor_tensors: int,
    generator: torch.Generator,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the paper's optimisation on dense targets.

    Args:
        delta: (G, K, d, k) ΔW_i per module and task (scale folded in).
        rank: r of A'.
        num_heads: M.
        distance: registry name of f.
        epochs, lr, weight_decay: AdamW settings (paper: 1000, 0.01, torch default 0.01).
        temperature: T in softmax(C'/T).
        num_factor_tensors: J of the paper's normalisation (over the whole adapter set).
        generator: source of the initial A' and C'.
        progress: optional callable told about each finished epoch.

    Returns:
        A' (G, r, k), heads (G, M, d, r), routing (G, K) by argmax of C'.
    """
    G, K, d, k = delta.shape
    M = num_heads
    f = get_distance(distance)
    a, b, c = init_params(
        G, K, M, d, rank, k, generator=generator, device=delta.device, dtype=delta.dtype
    )
    params = [p.requires_grad_(True) for p in (a, b, c) if p is not None]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    norm = 1.0 / (K * num_factor_tensors)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        if c is None:
            mixed = b  # (G, K, d, r): head i serves task i
        else:
            weights = torch.softmax(c / temperature, dim=-1)  # (G, K, M)
            mixed = torch.einsum("gkm,gmdr->gkdr", weights, b)
        loss = f(delta, mixed @ a[:, None]).sum() * norm
        loss.backward()
        opt.step()
        if progress is not None:
            progress(1)
    routing = (
        torch.arange(K, device=delta.device).expand(G, K).clone() if c is None else c.argmax(-1)
    )
    return a.detach(), b.detach(), routing
