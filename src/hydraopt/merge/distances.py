"""Distances f(ΔW, ΔW') between dense updates, batched over leading axes.

The paper's default is the mean absolute error, chosen to induce sparsity; its ablation also uses
MSE, the Frobenius norm and the cosine distance. Each function maps (..., d, k) x (..., d, k) to
(...,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The names live torch-free beside the configs that use them; imported from here as before.
from hydraopt.merge.choices import DISTANCES as DISTANCES
from hydraopt.merge.choices import Distance as Distance


def mae(target: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (target - approx).abs().mean(dim=(-2, -1))


def mse(target: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (target - approx).square().mean(dim=(-2, -1))


def fro(target: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(target - approx, ord="fro")


def cos(target: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of the flattened matrices (0 when parallel).

    Computed in float64: near the optimum 1 - cos ~ angle^2 / 2, so float32 rounding of the
    similarity (1e-7) would hide angles up to ~5e-4 and leave the solver blind there.
    """
    t, a = target.flatten(-2).double(), approx.flatten(-2).double()
    sim = (t * a).sum(-1) / (t.norm(dim=-1) * a.norm(dim=-1)).clamp_min(1e-300)
    return (1.0 - sim).to(target.dtype)


_FUNCS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mae": mae,
    "mse": mse,
    "fro": fro,
    "cos": cos,
}


def get_distance(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distance function called ``name`` (one of :data:`DISTANCES`)."""
    if name not in _FUNCS:
        raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")
    return _FUNCS[name]
