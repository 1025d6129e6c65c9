"""Blocked hard-routed errors over factor targets (many adapters) against the plain formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import random_stack

from hydraopt.merge.distances import get_distance
from hydraopt.merge.measure import (
    ERROR_BLOCK,
    distance_to_zero,
    hard_routed_error,
    hard_routed_errors,
)
from hydraopt.merge.targets import FactorTargets


@pytest.mark.parametrize("distance", ["mae", "mse", "fro"])
@pytest.mark.parametrize("heads", [1, 3, ERROR_BLOCK + 1, 20])
def test_factor_targets_error_equals_the_dense_formula(distance, heads):
    # K > ERROR_BLOCK: several blocks; M = 1 subtracts its one product from the formed targets,
    # more heads form one product per task: both must give the plain formula's numbers.
    stack = random_stack(G=2, K=20, d=7, k=6, r=2, seed=heads)
    targets = FactorTargets(stack.A, stack.scaled_B)
    gen = torch.Generator().manual_seed(heads)
    a = torch.randn(2, 2, 6, generator=gen)
    head_b = torch.randn(2, heads, 7, 2, generator=gen)
    routing = torch.randint(0, heads, (2, 20), generator=gen)
    approx = head_b[torch.arange(2)[:, None], routing] @ a[:, None]  # (G, K, d, k)
    want = get_distance(distance)(stack.delta(), approx)
    got = hard_routed_error(targets, a, head_b, routing, distance)
    assert got.shape == (2, 20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("distance", ["mae", "mse", "fro"])
def test_one_pass_errors_equal_the_separate_evaluations_bit_for_bit(distance):
    # Several points and the zero yardstick from one formation of each block's targets: the
    # very numbers of hard_routed_error and distance_to_zero (the merge's results must not move).
    stack = random_stack(G=2, K=ERROR_BLOCK * 2 + 3, d=7, k=6, r=2, seed=3)
    targets = FactorTargets(stack.A, stack.scaled_B)
    gen = torch.Generator().manual_seed(1)
    K = stack.A.shape[1]
    points = [
        (torch.randn(2, 2, 6, generator=gen), torch.randn(2, heads, 7, 2, generator=gen))
        for heads in (1, 3, K)
    ]
    routings = [torch.zeros(2, K, dtype=torch.long), torch.randint(0, 3, (2, K), generator=gen)]
    routings.append(torch.arange(K).expand(2, K))
    for (a, h), routing in zip(points, routings, strict=True):
        pair = [(a, h), (a * 1.5, h)]
        (first, second), zero = hard_routed_errors(targets, pair, routing, distance, with_zero=True)
        assert torch.equal(first, hard_routed_error(targets, a, h, routing, distance))
        assert torch.equal(second, hard_routed_error(targets, a * 1.5, h, routing, distance))
        assert zero is not None
        assert torch.equal(zero, distance_to_zero(targets, distance))
    # Dense targets take the one-by-one path: the same numbers too.
    a, h = points[1]
    (dense_err,), none = hard_routed_errors(stack.delta(), [(a, h)], routings[1], distance)
    assert none is None
    torch.testing.assert_close(
        dense_err, hard_routed_error(targets, a, h, routings[1], distance), rtol=1e-5, atol=1e-7
    )


def _tiny_tiles(monkeypatch, K, seed):
    """Tiles of 3 tasks x 2 rows (short on both axes for d = 7, K not a multiple of 3), K random
    factor targets (G = 2, d = 7, k = 6, r = 2), a generator and a random A' drawn from it."""
    from hydraopt.merge import measure

    monkeypatch.setattr(measure, "TILE_TASKS", 3)
    monkeypatch.setattr(measure, "TILE_ELEMENTS", 3 * 2 * 6)
    stack = random_stack(G=2, K=K, d=7, k=6, r=2, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return stack, FactorTargets(stack.A, stack.scaled_B), gen, torch.randn(2, 2, 6, generator=gen)


@pytest.mark.parametrize("distance", ["mae", "mse", "fro"])
@pytest.mark.parametrize("heads", [1, 3, 11])
def test_tiles_smaller_than_a_task_give_the_dense_formula(distance, heads, monkeypatch):
    # Many adapters are measured a tile (tasks x rows x k) at a time, the row tiles' sums added in
    # float64: tiles of 3 tasks x 2 rows (the last one short on both axes) against the formula.
    stack, targets, gen, a = _tiny_tiles(monkeypatch, ERROR_BLOCK + 3, seed=heads)
    K = stack.A.shape[1]
    head_b = torch.randn(2, heads, 7, 2, generator=gen)
    routing = torch.randint(0, heads, (2, K), generator=gen)
    approx = head_b[torch.arange(2)[:, None], routing] @ a[:, None]  # (G, K, d, k)
    want = get_distance(distance)(stack.delta(), approx)
    (got,), zero = hard_routed_errors(targets, [(a, head_b)], routing, distance, with_zero=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want_zero = get_distance(distance)(stack.delta(), torch.zeros_like(approx))
    torch.testing.assert_close(zero, want_zero, rtol=1e-6, atol=0)
    assert torch.equal(got, hard_routed_error(targets, a, head_b, routing, distance))


def test_few_tasks_keep_the_blocked_loop():
    # K <= ERROR_BLOCK: one block, the numbers of the block loop (not the tiles) bit for bit.
    stack = random_stack(G=1, K=ERROR_BLOCK, d=7, k=6, r=2, seed=4)
    targets = FactorTargets(stack.A, stack.scaled_B)
    a, h = torch.randn(1, 2, 6), torch.randn(1, 1, 7, 2)
    routing = torch.zeros(1, ERROR_BLOCK, dtype=torch.long)
    err = (stack.delta() - h[:, 0] @ a).abs().sum(dim=(-2, -1)) / 42
    assert torch.equal(hard_routed_error(targets, a, h, routing, "mae"), err)


@pytest.mark.parametrize("distance", ["mae", "mse", "fro"])
@pytest.mark.parametrize("heads", [1, 2, 17])
def test_fused_tiles_give_the_torch_tiles_numbers(distance, heads, monkeypatch):
    # The numba reduction (few heads: each head's H_c A' formed once and picked per task; many:
    # the GEMM's error tile reduced) against the torch tiles and the plain formula, with tiles
    # short on both axes, several points (one of each head count) and the zero yardstick.
    from hydraopt.merge import measure
    from hydraopt.merge.kernels import fused_available

    if not fused_available("cpu", torch.float32):
        pytest.skip("numba is not installed")
    stack, targets, gen, a = _tiny_tiles(monkeypatch, ERROR_BLOCK + 12, seed=heads)
    K = stack.A.shape[1]
    points = [(a, torch.randn(2, heads, 7, 2, generator=gen)), (a * 0.5, torch.randn(2, 1, 7, 2))]
    routing = torch.randint(0, heads, (2, K), generator=gen)
    # the one-head point is routed to head 0 by any routing: both points share it
    fused, fused_zero = hard_routed_errors(targets, points, routing, distance, with_zero=True)
    monkeypatch.setattr(measure, "fused_available", lambda *args: False)
    plain, plain_zero = hard_routed_errors(targets, points, routing, distance, with_zero=True)
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_zero, plain_zero, rtol=1e-6, atol=0)
    approx = points[0][1][torch.arange(2)[:, None], routing] @ a[:, None]
    want = get_distance(distance)(stack.delta(), approx)
    torch.testing.assert_close(fused[0], want, rtol=1e-6, atol=0)


def test_tile_sums_kernel_against_the_formula():
    from hydraopt.merge.kernels import fused_available, tile_sums

    if not fused_available("cpu", torch.float32):
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(0)
    tile, xs = torch.randn(5, 3, 33, generator=gen), torch.randn(3, 4, 33, generator=gen)
    sel = torch.randint(0, 4, (5, 2), generator=gen)
    for square in (False, True):
        got = tile_sums(tile, xs, sel, square)
        f = (lambda e: e.square()) if square else (lambda e: e.abs())
        for i in range(5):
            for p in range(2):
                want = f(tile[i].double() - xs[:, sel[i, p]].double()).sum()
                torch.testing.assert_close(got[i, p], want, rtol=1e-6, atol=0)
            torch.testing.assert_close(got[i, 2], f(tile[i].double()).sum(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="float32"):
        tile_sums(tile.double(), xs, sel, False)
