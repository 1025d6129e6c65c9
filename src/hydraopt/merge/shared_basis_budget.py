"""Rank per module for a storage budget: spend the parameters where they buy the most error.

A module of shape (d, k) with rank R stores U (d R), V (k R) and K cores (K R² full, K R
diagonal). Given a budget in percent of the K separate adapters' parameters Σ K r (d + k), we
pick R_m per module (1 <= R_m <= R_max) with Σ cost_m(R_m) <= budget, to the parameter.

The error of each R comes from one HOSVD per module at R_max (:func:`rank_curves`): the nested
truncations of its bases give the exact HOSVD error at every R at once (the sweeps then only
lower it). The per-module errors are put on the scale of the reported distance before they are
added (:func:`curve_for_distance`): the reported error is a mean over modules of a per-element
mean, so a module's squared error counts divided by d k.

Allocation (:func:`allocate_ranks`): greedy with look-ahead. Every module starts at R = 1; each
step takes, over all modules and all larger ranks that still fit, the move with the largest
error drop per parameter. Looking past R + 1 lets it cross a flat stretch of a non-convex curve
(where plain marginal greedy stalls); on convex curves it is marginal greedy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hydraopt.merge.closed_form import total_energy
from hydraopt.merge.shared_basis import (
    Core,
    diagonal_cores,
    diagonalising_rotation,
    full_cores,
    hosvd,
    working_dtype,
)


def basis_params(d: int, k: int, num_tasks: int, rank: int, core: Core) -> int:
    """Parameters of one module's shared basis: U d R + V k R + K R² (full) or K R (diagonal)."""
    per_task = rank * rank if core == "full" else rank
    return (d + k) * rank + num_tasks * per_task


def budget_params(shapes: Sequence[tuple[int, int, int]], num_tasks: int, percent: float) -> int:
    """floor(percent / 100 x Σ K r (d + k)) over modules of shape (d, k, r)."""
    full = sum(num_tasks * r * (d + k) for d, k, r in shapes)
    return math.floor(full * percent / 100.0)


def max_rank(d: int, k: int, r: int, num_tasks: int) -> int:
    """Largest useful R: the stacked updates have rank <= K r, and U, V need R <= min(d, k)."""
    return min(d, k, num_tasks * r)


def useful_rank(d: int, k: int, r: int, num_tasks: int, core: Core) -> int:
    """:func:`max_rank`, further capped where the basis would outgrow the module's K adapters.

    A module whose basis stores more than its K separate adapters (K r (d + k)) is never what
    a storage budget is for, and the cap bounds the survey: at K = 100, d = k = 576, r = 32 it
    is R = 189 (full cores) instead of 576, so the (K, R, R) cores of the curve stay small.
    """
    top = max_rank(d, k, r, num_tasks)
    limit = num_tasks * r * (d + k)
    while top > 1 and basis_params(d, k, num_tasks, top, core) > limit:
        top -= 1
    return top


def rank_curves(
    A: torch.Tensor, scaled_B: torch.Tensor, core: Core, top: int | None = None
) -> torch.Tensor:
    """Squared HOSVD error at every R = 0 .. R_max (G, R_max + 1), from the factors.

    ``top`` caps R_max (default :func:`max_rank`); the HOSVD bases are nested, so a cap only
    shortens the curve (full cores).

    Full cores: with U, V the top-R_max HOSVD bases, the rank-R HOSVD keeps their first R
    columns, so its captured energy is Σ_i ||S_i[:R, :R]||², a 2-D prefix sum of Σ_i S_i∘S_i.
    Diagonal cores: the bases rotated to diagonalise Σ S_i S_iᵀ, directions sorted by the energy
    of their diagonal entries.
    """
    G, K, r, k = A.shape
    d = scaled_B.shape[2]
    a64, b64 = A.to(torch.float64), scaled_B.to(torch.float64)
    top = max_rank(d, k, r, K) if top is None else min(top, max_rank(d, k, r, K))
    work = working_dtype(A, d, k)  # float32 for many tasks, as the merge (issue 18)
    a, b = A.to(work), scaled_B.to(work)
    U, V = hosvd(a, b, top)
    if core == "full":
        cores = full_cores(a, b, U, V)  # (G, K, top, top)
        energy = cores.square().sum(1).to(torch.float64).cumsum(1).cumsum(2)  # (G, top, top)
        captured = torch.diagonal(energy, dim1=1, dim2=2)  # (G, top)
    else:
        U, V = U.to(torch.float64), V.to(torch.float64)
        U, V = diagonalising_rotation(U, V, full_cores(a64, b64, U, V))
        per_dir = diagonal_cores(a64, b64, U, V).square().sum(1)  # (G, top)
        captured = per_dir.sort(dim=1, descending=True).values.cumsum(1)
    total = total_energy(a64, b64)  # (G,)
    curve = torch.cat([total[:, None], (total[:, None] - captured)], dim=1)
    return curve.clamp_min(0.0)


def curve_for_distance(curve: torch.Tensor, d: int, k: int, distance: str) -> torch.Tensor:
    """Squared errors (..., R) on the scale of the per-module mean the error report averages.

    mse: the squared error per element, e / (d k). The others (mae, fro, cos) grow like the RMS
    error, sqrt(e / (d k)): MAE ≈ 0.8 RMS for errors without heavy tails.
    """
    per_element = curve / (d * k)
    return per_element if distance == "mse" else per_element.sqrt()


@dataclass(frozen=True)
class Allocation:
    """Ranks per module and what they cost.

    Attributes:
        ranks: R per module, in the order given.
        params: Σ basis_params over modules (<= budget).
        budget: the parameter budget.
        error: Σ of the curves at the chosen ranks (the allocator's objective).
    """

    ranks: tuple[int, ...]
    params: int
    budget: int
    error: float


def allocate_ranks(
    curves: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    num_tasks: int,
    budget: int,
    core: Core,
) -> Allocation:
    """R per module minimising Σ_m curves[m][R_m] with Σ cost_m(R_m) <= budget (greedy, look-ahead).

    Args:
        curves: per module, its error at R = 0 .. R_max (R_max may differ between modules).
        shapes: per module, (d, k).
        num_tasks: K.
        budget: parameters available (see :func:`budget_params`).
        core: ``full`` or ``diagonal`` (the cost of a core).

    Raises:
        ValueError: if R = 1 everywhere already exceeds the budget.
    """
    n = len(curves)
    top = max(int(c.shape[0]) - 1 for c in curves)
    # (n, top + 1) tables padded past each module's R_max with an infinite cost.
    err = torch.full((n, top + 1), float("inf"), dtype=torch.float64)
    cost = torch.full((n, top + 1), float("inf"), dtype=torch.float64)
    ranks_axis = torch.arange(top + 1)
    for m, (curve, (d, k)) in enumerate(zip(curves, shapes, strict=True)):
        size = int(curve.shape[0])
        err[m, :size] = curve.to(torch.float64)
        cost[m, :size] = torch.tensor(
            [basis_params(d, k, num_tasks, int(R), core) for R in ranks_axis[:size]],
            dtype=torch.float64,
        )
    ranks = torch.ones(n, dtype=torch.long)
    rows = torch.arange(n)
    spent = float(cost[rows, ranks].sum())
    if spent > budget:
        raise ValueError(
            f"the budget of {budget} parameters is below the smallest shared basis "
            f"(R = 1 in every module: {int(spent)} parameters); raise --budget"
        )
    while True:
        now_err, now_cost = err[rows, ranks][:, None], cost[rows, ranks][:, None]
        extra = cost - now_cost  # (n, top + 1)
        gain = now_err - err
        allowed = (ranks_axis[None, :] > ranks[:, None]) & (extra <= budget - spent) & (gain > 0)
        rate = torch.where(allowed, gain / extra, torch.tensor(-1.0, dtype=torch.float64))
        best = int(rate.argmax())
        m, R = divmod(best, top + 1)
        if not bool(allowed[m, R]):
            break
        spent += float(extra[m, R])
        ranks[m] = R
    chosen = tuple(int(R) for R in ranks)
    return Allocation(chosen, int(spent), budget, float(err[rows, ranks].sum()))
