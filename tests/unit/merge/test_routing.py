"""Hard routing against brute force: cluster distances from explicit means, Lloyd's fixed point,
and best_routing's error against the exact optimum of every partition of a few tasks."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_stack

from hydraopt.merge.routing import (
    _distances_to_clusters,
    _gram,
    best_routing,
    canonical_labels,
    kmeans_pp,
    lloyd,
)
from hydraopt.types import LoraStack


def brute_distances(points: torch.Tensor, routing: torch.Tensor, m: int) -> torch.Tensor:
    """||p_i - mean of head c||² from the points themselves (K, M); inf for an empty head."""
    out = torch.full((points.shape[0], m), float("inf"), dtype=torch.float64)
    for c in range(m):
        members = points[routing == c]
        if len(members):
            out[:, c] = (points - members.mean(0)).square().sum(1)
    return out


def test_cluster_distances_from_the_gram_equal_explicit_means():
    gen = torch.Generator().manual_seed(0)
    projected = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)  # (G, K, d, r)
    routing = torch.tensor([[0, 0, 1, 2, 1, 0], [1, 1, 1, 0, 0, 1]])
    got = _distances_to_clusters(_gram(projected), routing, 3)
    for g in range(2):
        want = brute_distances(projected[g].flatten(1), routing[g], 3)
        assert torch.allclose(got[g], want, rtol=1e-10, atol=1e-10)


def test_lloyd_ends_where_every_task_is_nearest_its_own_head():
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(1, 9, 2, 2, generator=gen, dtype=torch.float64)
    gram = _gram(points)
    start = kmeans_pp(gram, 3, torch.Generator().manual_seed(2))
    routing = lloyd(gram, start, 3)
    dist = brute_distances(points[0].flatten(1), routing[0], 3)
    assert set(routing[0].tolist()) == {0, 1, 2}  # no head left empty
    own = dist.gather(1, routing[0][:, None]).squeeze(1)
    assert torch.all(own <= dist.min(1).values + 1e-12)


def test_kmeans_pp_routes_every_center_to_itself_and_uses_every_head():
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(4, 7, 3, 2, generator=gen, dtype=torch.float64)
    routing = kmeans_pp(_gram(points), 4, torch.Generator().manual_seed(4))
    assert routing.shape == (4, 7)
    for g in range(4):
        assert set(routing[g].tolist()) == {0, 1, 2, 3}


def partitions(K: int, M: int):
    """Every routing of K tasks onto exactly M heads, one per partition (canonical labels)."""
    seen = set()
    for labels in itertools.product(range(M), repeat=K):
        if len(set(labels)) == M:
            key = tuple(canonical_labels(torch.tensor([labels]))[0].tolist())
            if key not in seen:
                seen.add(key)
                yield torch.tensor(key)


def exact_error(delta: torch.Tensor, routing: torch.Tensor, r: int) -> float:
    """min over A' (rank r) and heads of sum_i ||ΔW_i - B'_route(i) A'||², by linear algebra.

    For a fixed row space (projector Π) the best head is the cluster mean times Π, so the error
    is the within-cluster sum of squares plus sum_c n_c ||mean_c (I - Π)||²: the second term is
    smallest for Π onto the top r right singular vectors of the stacked sqrt(n_c) mean_c.
    """
    within, stacked = 0.0, []
    for c in routing.unique():
        members = delta[routing == c]  # (n_c, d, k)
        mean = members.mean(0)
        within += float((members - mean).square().sum())
        stacked.append(len(members) ** 0.5 * mean)
    s = torch.linalg.svdvals(torch.cat(stacked))  # (min(M d, k),)
    return within + float(s[r:].square().sum())


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_best_routing_error_is_the_exact_error_of_its_routing(M):
    stack = random_stack(G=2, K=4, d=5, k=6, r=2, seed=M)
    A, B = stack.A.double(), stack.scaled_B.double()
    routing, a, err = best_routing(A, B, M, generator=torch.Generator().manual_seed(0))
    delta = B @ A  # (G, K, d, k)
    for g in range(2):
        assert len(routing[g].unique()) == M
        assert err[g].item() == pytest.approx(exact_error(delta[g], routing[g], 2), rel=1e-8)


def test_best_routing_finds_the_brute_force_optimum_of_planted_groups():
    # Tasks 0, 2, 3 and 1, 4 share an update up to small noise: the best 2-head routing groups
    # them, and its error is the smallest over all 15 partitions.
    gen = torch.Generator().manual_seed(5)
    base_a, base_b = torch.randn(2, 2, 6, generator=gen), torch.randn(2, 5, 2, generator=gen)
    group = torch.tensor([0, 1, 0, 0, 1])
    A = base_a[group] + 0.05 * torch.randn(5, 2, 6, generator=gen)
    B = base_b[group] + 0.05 * torch.randn(5, 5, 2, generator=gen)
    stack = LoraStack(A=A[None].double(), B=B[None].double(), scale=torch.ones(1, 5).double())
    routing, _, err = best_routing(stack.A, stack.scaled_B, 2, generator=torch.Generator())
    delta = stack.delta()[0]
    errors = {tuple(p.tolist()): exact_error(delta, p, 2) for p in partitions(5, 2)}
    best = min(errors, key=errors.__getitem__)
    assert tuple(canonical_labels(routing)[0].tolist()) == best == (0, 1, 0, 0, 1)
    assert err[0].item() == pytest.approx(errors[best], rel=1e-8)


def test_many_adapters_gram_of_heads_sums_float32_blocks_in_float64(monkeypatch):
    # K >= FLOAT32_GRAM_FROM: <P_i, P_j> from float32 products over column blocks (3 columns
    # here, the last block short), summed in float64: the float64 product's numbers to ~1e-6.
    from hydraopt.merge import routing as routing_mod
    from hydraopt.merge.closed_form import FLOAT32_GRAM_FROM

    monkeypatch.setattr(routing_mod, "GRAM_COLUMNS", 3)
    K = FLOAT32_GRAM_FROM
    heads = torch.randn(2, K, 4, 2, generator=torch.Generator().manual_seed(0))
    want = heads.double().flatten(2) @ heads.double().flatten(2).transpose(1, 2)
    got = routing_mod._gram(heads)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    few = heads[:, : K - 1]  # fewer tasks: the float64 product itself
    flat = few.double().flatten(2)
    assert torch.equal(routing_mod._gram(few), flat @ flat.transpose(1, 2))


def test_many_adapters_search_returns_the_exact_closed_form_of_its_routing():
    # From FLOAT32_GRAM_FROM tasks the search runs the float64 closed form (float32 products)
    # and skips the redo: its A' and error are the closed form's for the routing it returns.
    from hydraopt.merge.closed_form import FLOAT32_GRAM_FROM, shared_a
    from hydraopt.merge.routing import best_routing

    K = FLOAT32_GRAM_FROM + 2
    stack = random_stack(G=2, K=K, d=6, k=8, r=2, seed=4)
    routing, a, err = best_routing(
        stack.A, stack.scaled_B, 3, generator=torch.Generator().manual_seed(0)
    )
    exact_a, exact_err = shared_a(stack.A, stack.scaled_B, routing, 3)
    assert torch.equal(a, exact_a) and torch.equal(err, exact_err)
    assert err.dtype == torch.float64
