"""The byte-budget allocator against brute force on tiny instances."""

from __future__ import annotations

import itertools
import random

import pytest

from hydraopt.budget import Option, allocate


def _instance(seed: int, modules: int = 4, per_module: int = 4) -> list[list[Option]]:
    rng = random.Random(seed)
    out = []
    for _ in range(modules):
        opts = [Option(rng.randint(1, 40), rng.uniform(0, 10)) for _ in range(per_module)]
        out.append(opts)
    return out


def _brute_force(options: list[list[Option]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(o.nbytes for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_budget_never_exceeded_and_close_to_optimum(seed: int) -> None:
    options = _instance(seed)
    cheapest = sum(min(o.nbytes for o in opts) for opts in options)
    for budget in range(cheapest, cheapest + 120, 7):
        got = allocate(options, budget)
        assert got.nbytes <= budget
        assert got.nbytes == sum(options[m][c].nbytes for m, c in enumerate(got.choice))
        assert got.error == pytest.approx(
            sum(options[m][c].error for m, c in enumerate(got.choice))
        )
        assert got.error >= _brute_force(options, budget) - 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_exact_at_every_lagrangian_point(seed: int) -> None:
    # For any lambda, taking per module argmin(error + lambda * bytes) is optimal for the bytes it
    # spends (Everett); the allocator must find that optimum when given exactly those bytes.
    options = _instance(seed)
    for lam in [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0]:
        picks = [min(opts, key=lambda o: (o.error + lam * o.nbytes, o.nbytes)) for opts in options]
        budget = sum(o.nbytes for o in picks)
        optimum = _brute_force(options, budget)
        assert sum(o.error for o in picks) == pytest.approx(optimum)
        assert allocate(options, budget).error == pytest.approx(optimum)


def test_hand_made_case() -> None:
    # Module 0 gains 9 for 10 bytes, module 1 gains 5 for 10 bytes: 10 spare bytes go to module 0.
    options = [
        [Option(10, 10.0, "M=1"), Option(20, 1.0, "M=2")],
        [Option(10, 6.0, "M=1"), Option(20, 1.0, "M=2")],
    ]
    got = allocate(options, 30)
    assert got.choice == (1, 0) and got.nbytes == 30 and got.error == 7.0
    assert allocate(options, 40).choice == (1, 1)
    assert allocate(options, 29).choice == (0, 0)


def test_dominated_and_equal_cost_options() -> None:
    options = [[Option(5, 3.0), Option(5, 2.0), Option(8, 2.5), Option(9, 0.5)]]
    assert allocate(options, 5).choice == (1,)
    assert allocate(options, 8).choice == (1,)
    assert allocate(options, 9).choice == (3,)


def test_refuses_impossible_budget_and_empty_module() -> None:
    with pytest.raises(ValueError, match="below the smallest possible size"):
        allocate([[Option(10, 1.0)]], 9)
    with pytest.raises(ValueError, match="at least one"):
        allocate([[]], 100)


@pytest.mark.parametrize("seed", range(8))
def test_max_error_dual_reaches_the_target_with_path_optimal_bytes(seed: int) -> None:
    from hydraopt.budget import allocate_for_error

    options = _instance(seed)
    least = sum(min(o.error for o in opts) for opts in options)
    worst = sum(max(o.error for o in opts) for opts in options)
    for target in (least, (least + worst) / 2, worst):
        got = allocate_for_error(options, target)
        assert got.error <= target + 1e-9
        assert got.nbytes == sum(options[m][c].nbytes for m, c in enumerate(got.choice))
        # Fewer bytes than the allocator's choice cannot do better than its error (Lagrangian
        # optimality of the path point), so allocate() at that budget agrees on the error.
        assert allocate(options, got.nbytes).error <= got.error + 1e-9
    with pytest.raises(ValueError, match="below the least reachable"):
        allocate_for_error(options, least - 1.0)
