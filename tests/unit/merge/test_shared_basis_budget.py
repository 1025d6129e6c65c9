"""Rank allocation for a storage budget: exact accounting and optimality on hand-made cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_stack

from hydraopt.merge.shared_basis import closed_form
from hydraopt.merge.shared_basis_budget import (
    allocate_ranks,
    basis_params,
    budget_params,
    curve_for_distance,
    rank_curves,
)


def test_parameter_counts_by_hand():
    # U 10x3 + V 4x3 + 5 cores 3x3, or 5 diagonals of 3
    assert basis_params(10, 4, 5, 3, "full") == 30 + 12 + 45
    assert basis_params(10, 4, 5, 3, "diagonal") == 30 + 12 + 15
    # 10 % of 2 x [5 x 8 x (10 + 4)] = 112 parameters
    assert budget_params([(10, 4, 8), (10, 4, 8)], 5, 10.0) == 112
    assert budget_params([(10, 4, 8)], 5, 0.9) == 5  # floor(5.04)


@pytest.mark.parametrize("core", ["full", "diagonal"])
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # float32 inputs: the survey forms the (K, R, R) cores in float32 (cost, issue 18)
    [(torch.float64, 1e-10), (torch.float32, 1e-4)],
)
@pytest.mark.parametrize("K", [3, 6])  # K r = 6 < d = 9, and 12 > d: the float32 Gram path
def test_full_curve_is_the_hosvd_error_at_every_rank(core, dtype, rtol, K):
    stack = random_stack(G=2, K=K, d=9, k=8, r=2, seed=11)
    A, B = stack.A.to(dtype), stack.scaled_B.to(dtype)
    curve = rank_curves(A, B, core)  # (G, top + 1): R = 0 .. min(d, k, K r)
    top = min(8, K * 2)
    assert curve.shape == (2, top + 1)
    assert torch.all(curve[:, 1:] <= curve[:, :-1] + 1e-9)
    if core == "full":
        for R in range(1, top + 1):
            ref = closed_form(A.double(), B.double(), R, "full", sweeps=0).squared_error
            # rounding is relative to the energy (curve[:, 0]), not to a vanishing error
            assert torch.allclose(curve[:, R], ref, rtol=rtol, atol=rtol * 0.1 * curve[:, 0].max())


def brute_force(curves, shapes, K, budget, core):
    """The best allocation by enumerating every rank vector."""
    best = (float("inf"), None)
    for ranks in itertools.product(*[range(1, len(c)) for c in curves]):
        cost = sum(basis_params(d, k, K, R, core) for (d, k), R in zip(shapes, ranks, strict=True))
        if cost <= budget:
            err = sum(float(c[R]) for c, R in zip(curves, ranks, strict=True))
            best = min(best, (err, ranks), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_allocation_is_optimal_on_a_hand_made_case(core):
    # Module 0 is flat at R = 2 then drops (marginal greedy stalls there); module 1 is convex;
    # module 2 is tiny and nearly solved at R = 1.
    curves = [
        torch.tensor([10.0, 9.0, 8.9, 1.0, 0.5]),
        torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5]),
        torch.tensor([1.0, 0.1, 0.05, 0.04, 0.0]),
    ]
    shapes = [(6, 5), (6, 5), (3, 2)]
    K = 2
    for budget in range(50, 200, 7):
        try:
            alloc = allocate_ranks(curves, shapes, K, budget, core)
        except ValueError:
            assert brute_force(curves, shapes, K, budget, core)[1] is None
            continue
        cost = sum(
            basis_params(d, k, K, R, core) for (d, k), R in zip(shapes, alloc.ranks, strict=True)
        )
        assert alloc.params == cost <= budget
        err, _ = brute_force(curves, shapes, K, budget, core)
        assert alloc.error == pytest.approx(err), (budget, alloc)


def test_budget_respected_to_the_parameter_on_real_curves():
    stack = random_stack(G=6, K=4, d=20, k=12, r=4, seed=12)
    raw = rank_curves(stack.A, stack.scaled_B, "full")
    curves = list(curve_for_distance(raw, 20, 12, "mae"))
    shapes = [(20, 12)] * 6
    for percent in (10.0, 20.0, 50.0, 100.0):
        budget = budget_params([(20, 12, 4)] * 6, 4, percent)
        alloc = allocate_ranks(curves, shapes, 4, budget, "full")
        assert alloc.params == sum(basis_params(20, 12, 4, R, "full") for R in alloc.ranks)
        assert alloc.params <= budget
        # nothing left that would still fit and help: every module at its top or too dear
        for m, R in enumerate(alloc.ranks):
            if len(curves[m]) - 1 > R:
                step = basis_params(20, 12, 4, R + 1, "full") - basis_params(20, 12, 4, R, "full")
                assert alloc.params + step > budget or curves[m][R + 1] >= curves[m][R]


def test_budget_below_rank_one_is_refused():
    curves = [torch.tensor([1.0, 0.5, 0.0])] * 2
    with pytest.raises(ValueError, match="R = 1 in every module: 24 parameters"):
        allocate_ranks(curves, [(5, 5)] * 2, 2, 23, "full")
