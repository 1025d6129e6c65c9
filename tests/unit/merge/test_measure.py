"""Blocked hard-routed errors over factor targets (many adapters) against the plain formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import random_stack

from hydraopt.merge.distances import get_distance
from hydraopt.merge.measure import ERROR_BLOCK, hard_routed_error
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
