"""The closed form against dense, independent computations."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_stack

from hydraopt.merge import closed_form
from hydraopt.merge.closed_form import (
    projected_heads,
    routed_heads,
    shared_a,
    top_eigenpairs,
    total_energy,
)
from hydraopt.merge.routing import best_routing


def delta64(stack) -> torch.Tensor:
    """ΔW of module 0 in float64, (K, d, k)."""
    return (stack.scaled_B.double() @ stack.A.double())[0]


def dense_optimum(delta: torch.Tensor, routing: list[int], r: int) -> float:
    """Brute force for one module: squared error of the best (A', heads) for a fixed routing.

    G_W = sum_c n_c Dbar_c^T Dbar_c, computed densely; error = total - top-r eigenvalues.
    """
    K = delta.shape[0]
    delta = delta.to(torch.float64)
    total = float(delta.square().sum())
    gw = torch.zeros(delta.shape[2], delta.shape[2], dtype=torch.float64)
    for c in set(routing):
        members = [i for i in range(K) if routing[i] == c]
        mean = delta[members].to(torch.float64).mean(0)
        gw += len(members) * mean.T @ mean
    evals = torch.linalg.eigvalsh(gw)
    return total - float(evals[-r:].sum())


def partitions(K: int, M: int):
    """Every routing of K tasks onto exactly M non-empty heads (up to relabelling)."""
    seen = set()
    for labels in itertools.product(range(M), repeat=K):
        if len(set(labels)) != M:
            continue
        canon, mapping = [], {}
        for x in labels:
            canon.append(mapping.setdefault(x, len(mapping)))
        if tuple(canon) not in seen:
            seen.add(tuple(canon))
            yield list(canon)


def test_shared_a_reproduces_adapters_that_share_a():
    stack = random_stack(G=3, K=4, d=7, k=9, r=3, shared_a=True)
    K = 4
    routing = torch.arange(K).expand(3, K)
    a, err = shared_a(stack.A, stack.scaled_B, routing, K)
    heads = routed_heads(projected_heads(stack.A, stack.scaled_B, a), routing, K)
    approx = heads @ a[:, None]
    assert torch.allclose(approx, stack.delta(), atol=1e-6)
    assert float(err.max()) < 1e-8
    # A' has orthonormal rows
    eye = a @ a.transpose(1, 2)
    assert torch.allclose(eye, torch.eye(3).expand(3, 3, 3), atol=1e-6)


def test_total_energy_matches_dense():
    stack = random_stack(G=2, K=3)
    dense = stack.delta().to(torch.float64).square().sum(dim=(1, 2, 3))
    assert torch.allclose(total_energy(stack.A.double(), stack.scaled_B.double()), dense)


@pytest.mark.parametrize("routing", [[0, 1, 2], [0, 0, 1], [0, 1, 0], [0, 0, 0]])
def test_shared_a_matches_dense_optimum_for_fixed_routing(routing):
    stack = random_stack(G=1, K=3, d=6, k=8, r=2, seed=3)
    m = max(routing) + 1
    a, err = shared_a(stack.A, stack.scaled_B, torch.tensor([routing]), m)
    expected = dense_optimum(delta64(stack), routing, r=2)
    assert float(err[0]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # and the heads it implies really reach that error
    heads = routed_heads(projected_heads(stack.A, stack.scaled_B, a), torch.tensor([routing]), m)
    approx = heads[0][torch.tensor(routing)] @ a[0]
    assert float((delta64(stack) - approx).double().square().sum()) == pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.parametrize("K,M", [(4, 2), (5, 2), (5, 3), (4, 3)])
def test_best_routing_finds_brute_force_optimum(K, M):
    for seed in range(3):
        stack = random_stack(G=1, K=K, d=6, k=7, r=2, seed=seed)
        brute = min(dense_optimum(delta64(stack), p, r=2) for p in partitions(K, M))
        routing, a, err = best_routing(
            stack.A, stack.scaled_B, M, generator=torch.Generator().manual_seed(0), restarts=8
        )
        assert float(err[0]) == pytest.approx(brute, rel=1e-7), (seed, routing)
        assert len(set(routing[0].tolist())) == M  # every head used


def test_best_routing_groups_identical_tasks():
    # tasks 0,1 identical and 2,3 identical: with M = 2 the error must be zero
    base = random_stack(G=1, K=2, d=5, k=6, r=2, seed=1)
    A = base.A[:, [0, 0, 1, 1]]
    B = base.B[:, [0, 0, 1, 1]]
    from hydraopt.types import LoraStack

    stack = LoraStack(A, B, torch.ones(1, 4))
    routing, a, err = best_routing(A, stack.scaled_B, 2, generator=torch.Generator().manual_seed(0))
    r = routing[0].tolist()
    assert r[0] == r[1] and r[2] == r[3] and r[0] != r[2]
    # two rank-2 updates need a rank-4 shared A' to be exact; rank 2 keeps the best 2 directions
    assert float(err[0]) == pytest.approx(dense_optimum(delta64(stack), r, r=2), rel=1e-7)


@pytest.mark.parametrize("routing", [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 1], [0, 0, 0, 0]])
def test_factor_and_gram_paths_agree(routing):
    """K r > k uses the k x k path; both must give the same subspace and error."""
    stack = random_stack(G=2, K=4, d=6, k=9, r=3, seed=7)
    m = max(routing) + 1
    rt = torch.tensor([routing, routing])
    a_f, e_f = shared_a(stack.A, stack.scaled_B, rt, m, path="factors")
    a_g, e_g = shared_a(stack.A, stack.scaled_B, rt, m, path="gram")
    assert torch.allclose(e_f, e_g, rtol=1e-6)
    # same row space: projectors agree
    proj_f = a_f.transpose(1, 2) @ a_f
    proj_g = a_g.transpose(1, 2) @ a_g
    assert torch.allclose(proj_f, proj_g, atol=1e-5)
    expected = dense_optimum(delta64(stack), routing, r=3)
    assert float(e_g[0]) == pytest.approx(expected, rel=1e-7)


def test_many_adapters_take_the_gram_path_and_reproduce_shared_a():
    stack = random_stack(G=1, K=12, d=5, k=8, r=2, shared_a=True, seed=2)  # K r = 24 > k = 8
    routing = torch.arange(12)[None]
    a, err = shared_a(stack.A, stack.scaled_B, routing, 12)
    heads = routed_heads(projected_heads(stack.A, stack.scaled_B, a), routing, 12)
    assert torch.allclose(heads @ a[:, None], stack.delta(), atol=1e-5)
    assert float(err[0]) < 1e-8


def test_canonical_labels_and_distinct_partitions():
    from hydraopt.merge.routing import canonical_labels, distinct_partitions

    routing = torch.tensor([[1, 1, 0, 2], [2, 0, 2, 1]])
    assert canonical_labels(routing).tolist() == [[0, 0, 1, 2], [0, 1, 0, 2]]
    relabelled = torch.tensor([[2, 2, 1, 0], [0, 1, 0, 2]])  # the same partitions
    other = torch.tensor([[1, 1, 0, 2], [2, 2, 0, 1]])  # the second module differs
    kept = distinct_partitions([routing, relabelled, other, other.clone()])
    assert len(kept) == 2 and kept[0] is routing and kept[1] is other


def psd_with_spectrum(spectra: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """(G, n, n) U diag(spectrum) U^T with random orthogonal U, float64."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for spectrum in spectra:
        n = len(spectrum)
        u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        mats.append(u @ torch.diag(spectrum.double()) @ u.T)
    return torch.stack(mats)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_eigenpairs_equal_eigh_with_a_gap_a_flat_spectrum_and_zero(dtype, monkeypatch):
    """Subspace iteration must give eigh's top-r pairs: where it converges (a gap after r, as
    LoRA Grams have), where it cannot in SUBSPACE_MAX_ITER steps (flat: eigh fallback), and for
    a zero matrix, all in one batch."""
    n, r = 300, 12
    gapped = torch.cat([torch.linspace(10, 5, r), 0.03 * torch.rand(n - r)])
    flat = torch.linspace(1.0, 0.9, n)
    mat = psd_with_spectrum([gapped, flat, torch.zeros(n)]).to(dtype)
    iterations = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(
        closed_form.torch.linalg, "eigh", lambda m: (iterations.append(m.shape), eigh(m))[1]
    )
    vals, vecs = top_eigenpairs(mat, r)
    assert iterations[-1] == (1, n, n)  # only the flat spectrum fell back to a full eigh
    expected_vals, expected_vecs = eigh(mat.double())
    expected_vals, expected_vecs = expected_vals[:, -r:].flip(-1), expected_vecs[:, :, -r:]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(vals.double(), expected_vals, rtol=tol, atol=tol)
    # the same subspace (projectors), and orthonormal vectors
    for g in range(2):
        ours = vecs[g].double() @ vecs[g].double().T
        theirs = expected_vecs[g] @ expected_vecs[g].T
        assert torch.allclose(ours, theirs, atol=100 * tol)
    gram = vecs.transpose(1, 2).double() @ vecs.double()
    assert torch.allclose(gram, torch.eye(r, dtype=torch.float64).expand(3, r, r), atol=100 * tol)


def test_gram_path_with_subspace_iteration_matches_dense_optimum(monkeypatch):
    """k >= SUBSPACE_FROM with A's alike (a gap after r): the gram path's A' comes from subspace
    iteration, never a full eigh, and its error is the brute-force optimum."""
    from hydraopt.types import LoraStack

    k = closed_form.SUBSPACE_FROM
    base = random_stack(G=1, K=12, d=20, k=k, r=3, shared_a=True, seed=4)
    drift = 0.05 * torch.randn(base.A.shape, generator=torch.Generator().manual_seed(5))
    stack = LoraStack(A=base.A + drift, B=base.B, scale=base.scale)
    sizes = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(
        closed_form.torch.linalg, "eigh", lambda m: (sizes.append(m.shape[-1]), eigh(m))[1]
    )
    for routing in ([0] * 12, [0, 1] * 6, list(range(12))):
        m = max(routing) + 1
        a, err = shared_a(stack.A, stack.scaled_B, torch.tensor([routing]), m, path="gram")
        expected = dense_optimum(delta64(stack), routing, r=3)
        assert float(err[0]) == pytest.approx(expected, rel=1e-9)
        heads = routed_heads(
            projected_heads(stack.A, stack.scaled_B, a), torch.tensor([routing]), m
        )
        approx = heads[0][torch.tensor(routing)] @ a[0]
        assert float((delta64(stack) - approx).square().sum()) == pytest.approx(expected, rel=1e-5)
    assert sizes and k not in sizes


@pytest.mark.parametrize("heads", [1, 3, 70])
def test_many_adapters_gram_in_float32_products_matches_the_dense_optimum(heads):
    # K >= FLOAT32_GRAM_FROM: the k x k Gram's products over tasks run in float32 (sums in
    # float64). Against the brute-force dense optimum in float64, and the float64-product path:
    # the same error to ~1e-6 relative and the same subspace; one-task heads (M = K) take the
    # R_i^T R_i form, clusters the T_c^T T_c / n_c form, both appear at M = 3 / 70.
    K = closed_form.FLOAT32_GRAM_FROM + 6
    stack = random_stack(G=2, K=K, d=9, k=12, r=2, seed=heads)  # K r > k: the Gram path
    routing = torch.arange(K).expand(2, K) % heads
    routing[1, :] = torch.randperm(K, generator=torch.Generator().manual_seed(1)) % heads
    a, err = shared_a(stack.A, stack.scaled_B, routing, heads)
    a64, err64 = shared_a(stack.A.double(), stack.scaled_B.double(), routing, heads)
    assert a.dtype == torch.float32 and err.dtype == torch.float64
    for g in range(2):
        delta = (stack.scaled_B.double() @ stack.A.double())[g]
        want = dense_optimum(delta, routing[g].tolist(), 2)
        assert abs(float(err[g]) - want) <= 1e-6 * want
    torch.testing.assert_close(err, err64, rtol=1e-6, atol=0)
    # the same row space: A' A'^T of one against the other's projector
    overlap = (a.double() @ a64.transpose(1, 2)).svd().S
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-5)


def test_few_adapters_keep_float64_products():
    # Below FLOAT32_GRAM_FROM the Gram path is the float64 one, bit for bit.
    K = closed_form.FLOAT32_GRAM_FROM - 1
    stack = random_stack(G=1, K=K, d=5, k=8, r=2, seed=3)
    routing = torch.arange(K)[None] % 2
    a, err = shared_a(stack.A, stack.scaled_B, routing, 2, path="gram")
    vals, a64 = closed_form._top_eigen_gram(
        stack.A.double(), stack.scaled_B.double(), routing, 2, 2
    )
    assert torch.equal(a, a64.float())
    assert torch.equal(
        err, (total_energy(stack.A.double(), stack.scaled_B.double()) - vals.sum(-1)).clamp_min(0.0)
    )


def test_one_task_per_head_routed_heads_are_the_projected_heads_permuted():
    # M = K: the shortcut gathers each head's task instead of the one-hot product: equal values.
    stack = random_stack(G=2, K=6, d=4, k=5, r=2, seed=8)
    a, _ = shared_a(stack.A, stack.scaled_B, torch.zeros(2, 6, dtype=torch.long), 1)
    projected = projected_heads(stack.A, stack.scaled_B, a)
    routing = torch.stack([torch.arange(6), torch.tensor([3, 0, 5, 1, 4, 2])])
    onehot = torch.nn.functional.one_hot(routing, 6).to(projected.dtype)
    want = torch.einsum("gkm,gkdr->gmdr", onehot, projected)
    assert torch.equal(routed_heads(projected, routing, 6), want)
    # Not one task per head: the general formula (a mean of two)
    pairs = torch.tensor([[0, 0, 1, 2, 3, 4]] * 2)
    got = routed_heads(projected, pairs, 6)
    torch.testing.assert_close(got[:, 0], projected[:, :2].mean(1))
