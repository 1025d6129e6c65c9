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


# The separable distances as reductions of the difference E = ΔW' - ΔW alone, (..., d, k) ->
# (...), with n = d k: the same formulas as above (tests compare the two), applied *in place* to
# a caller's error buffer, so that a blocked evaluation over many tasks needs no second buffer.
# The cosine distance is not separable (it needs both norms) and has no entry.


def mae_of_error(err: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`mae` from E alone; overwrites ``err`` with |E|."""
    return err.abs_().sum(dim=(-2, -1)) / n


def mse_of_error(err: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`mse` from E alone; overwrites ``err`` with E²."""
    return err.square_().sum(dim=(-2, -1)) / n


def fro_of_error(err: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`fro` from E alone (``n`` unused); overwrites ``err`` with E²."""
    return err.square_().sum(dim=(-2, -1)).sqrt()


SEPARABLE: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "mae": mae_of_error,
    "mse": mse_of_error,
    "fro": fro_of_error,
}


def get_distance(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distance function called ``name`` (one of :data:`DISTANCES`)."""
    if name not in _FUNCS:
        raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")
    return _FUNCS[name]
