"""The two-sided shared basis against dense, independent computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_stack

from hydraopt.merge.distances import get_distance
from hydraopt.merge.shared_basis import (
    SharedBasisConfig,
    closed_form,
    cp_squared_error,
    cp_sweep,
    diagonal_cores,
    export_lora,
    full_cores,
    hooi_sweep,
    hosvd,
    procrustes_sweep,
    squared_error,
)
from hydraopt.merge.shared_basis_refine import fit_shared_basis, refine_basis


def dense(stack) -> torch.Tensor:
    """ΔW (G, K, d, k) in float64."""
    return stack.scaled_B.double() @ stack.A.double()


def dense_error(delta: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Σ_i ||ΔW_i - approx_i||² per module (G,), float64."""
    return (delta - approx.double()).square().sum(dim=(1, 2, 3))


def orthonormal(G: int, n: int, R: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(G, n, R, generator=gen, dtype=torch.float64)).Q


def sharing_adapters(core: str, *, G=2, K=4, d=9, k=7, R=3, seed=0):
    """Adapters whose updates are exactly U0 S_i V0ᵀ, each stored with its own factorisation.

    A_i = M_i V0ᵀ and B_i = U0 S_i M_i⁻¹ / scale_i with a random invertible M_i per task, so no
    two adapters have the same A or B although they share U0 and V0.
    """
    gen = torch.Generator().manual_seed(seed)
    U0, V0 = orthonormal(G, d, R, gen), orthonormal(G, k, R, gen)
    if core == "full":
        S = torch.randn(G, K, R, R, generator=gen, dtype=torch.float64)
    else:
        S = torch.diag_embed(torch.randn(G, K, R, generator=gen, dtype=torch.float64))
    M = torch.randn(G, K, R, R, generator=gen, dtype=torch.float64) + 3 * torch.eye(R)
    scale = torch.rand(G, K, generator=gen, dtype=torch.float64) + 0.5
    A = M @ V0.transpose(1, 2)[:, None]  # (G, K, R, k)
    B = U0[:, None] @ S @ torch.linalg.inv(M) / scale[:, :, None, None]  # (G, K, d, R)
    delta = U0[:, None] @ S @ V0.transpose(1, 2)[:, None]
    return A, B * scale[:, :, None, None], delta


@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_exact_when_adapters_share_both_bases(core):
    A, scaled_B, delta = sharing_adapters(core)
    out = closed_form(A.float(), scaled_B.float(), 3, core)
    assert torch.allclose(out.delta().double(), delta, atol=1e-5)
    assert float(out.squared_error.max()) < 1e-8
    # float64 in, float64 out: exact to rounding
    out64 = closed_form(A, scaled_B, 3, core)
    assert torch.allclose(out64.delta(), delta, atol=1e-12)


def test_full_rank_reproduces_any_adapters():
    """R = K r: both unfoldings of the stacked updates have rank <= K r, so nothing is lost."""
    stack = random_stack(G=2, K=3, d=8, k=7, r=2, seed=1)
    out = closed_form(stack.A, stack.scaled_B, 6, "full")
    assert torch.allclose(out.delta().double(), dense(stack), atol=1e-5)


def test_single_adapter_is_truncated_svd():
    """K = 1: both cores give the Eckart-Young optimum, the sum of the trailing σ²."""
    stack = random_stack(G=2, K=1, d=7, k=6, r=4, seed=2)
    sv = torch.linalg.svdvals(dense(stack)[:, 0])  # (G, 4 nonzero ...)
    for core in ("full", "diagonal"):
        out = closed_form(stack.A, stack.scaled_B, 2, core)
        expected = sv[:, 2:].square().sum(1)
        assert torch.allclose(out.squared_error.double(), expected, rtol=1e-5)


def dense_hooi(delta: torch.Tensor, R: int, sweeps: int) -> torch.Tensor:
    """Reference Tucker-2 HOOI with dense SVDs of the unfoldings; returns the squared error (G,)."""
    G, K, d, k = delta.shape
    U = torch.linalg.svd(delta.permute(0, 2, 1, 3).reshape(G, d, K * k)).U[:, :, :R]
    V = torch.linalg.svd(delta.permute(0, 3, 1, 2).reshape(G, k, K * d)).U[:, :, :R]
    for _ in range(sweeps):
        proj = delta @ V[:, None]  # (G, K, d, R)
        U = torch.linalg.svd(proj.permute(0, 2, 1, 3).reshape(G, d, K * R)).U[:, :, :R]
        back = delta.transpose(-1, -2) @ U[:, None]  # (G, K, k, R)
        V = torch.linalg.svd(back.permute(0, 2, 1, 3).reshape(G, k, K * R)).U[:, :, :R]
    cores = U.transpose(1, 2)[:, None] @ delta @ V[:, None]
    return delta.square().sum(dim=(1, 2, 3)) - cores.square().sum(dim=(1, 2, 3))


@pytest.mark.parametrize("sweeps", [0, 1, 5])
@pytest.mark.parametrize("R", [3, 5])  # R > r = 3: the sweeps use a Gram factor of ΔW_i V
# K r = 12 > d = 10: many tasks, so float32 adapters are fitted in float32 (working_dtype)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_closed_form_matches_dense_hooi(sweeps, R, dtype, rtol):
    stack = random_stack(G=3, K=4, d=10, k=8, r=3, seed=3)
    out = closed_form(stack.A.to(dtype), stack.scaled_B.to(dtype), R, "full", sweeps)
    ref = dense_hooi(dense(stack), R, sweeps)
    assert torch.allclose(out.squared_error.double(), ref, rtol=rtol)
    assert torch.allclose(dense_error(dense(stack), out.delta()), ref, rtol=max(rtol, 1e-4))


def test_rank_one_matches_exhaustive_search():
    """R = 1 (full = diagonal): max over unit u (d = 3) and v of Σ_i (uᵀ ΔW_i v)².

    u runs over a fine grid of the sphere; for each u the best v is the top eigenvector of
    Σ_i w_i w_iᵀ with w_i = ΔW_iᵀ u (a dense 2 x 2 eigvalsh), so only u is searched.
    """
    stack = random_stack(G=1, K=3, d=3, k=2, r=2, seed=4)
    delta = dense(stack)[0]  # (K, 3, 2)
    n = 500
    theta = torch.linspace(0, math.pi, n, dtype=torch.float64)[:, None]
    phi = torch.linspace(0, 2 * math.pi, 2 * n, dtype=torch.float64)[None]
    u = torch.stack(
        [theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos().expand(n, 2 * n)], -1
    ).reshape(-1, 3)  # (2 n², 3) covers the sphere
    w = torch.einsum("ud,kde->uke", u, delta)  # (U, K, 2)
    captured = torch.linalg.eigvalsh(w.transpose(1, 2) @ w)[:, -1]  # (U,)
    brute = float(delta.square().sum() - captured.max())
    for core in ("full", "diagonal"):
        ours = float(closed_form(stack.A, stack.scaled_B, 1, core, sweeps=20).squared_error[0])
        # The grid can only miss the optimum from above; a grid step of ~0.006 rad moves the
        # captured energy by a relative ~1e-5 near the (flat) maximum.
        assert ours <= brute + 1e-12
        assert ours >= brute - 1e-4 * float(delta.square().sum())


def unit(angle: torch.Tensor) -> torch.Tensor:
    return torch.stack([angle.cos(), angle.sin()], -1)


def test_diagonal_rank_two_matches_exhaustive_search():
    """d = k = R = 2, diagonal cores: U, V are rotations (reflections only flip signs of s_i)."""
    stack = random_stack(G=1, K=3, d=2, k=2, r=2, seed=5)
    delta = dense(stack)[0]  # (K, 2, 2)
    angles = torch.linspace(0, 2 * math.pi, 1200, dtype=torch.float64)
    u1, u2 = unit(angles), unit(angles + math.pi / 2)  # columns of the rotation by each angle
    # captured = Σ_i Σ_j (u_jᵀ ΔW_i v_j)² for every pair of angles (a, b)
    c1 = torch.einsum("ad,kde,be->kab", u1, delta, u1).square().sum(0)
    c2 = torch.einsum("ad,kde,be->kab", u2, delta, u2).square().sum(0)
    brute = float(delta.square().sum() - (c1 + c2).max())
    ours = float(closed_form(stack.A, stack.scaled_B, 2, "diagonal", sweeps=50).squared_error[0])
    assert ours <= brute + 1e-12
    assert ours >= brute - 1e-4 * float(delta.square().sum())


@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_sweeps_never_increase_the_error(core):
    stack = random_stack(G=4, K=5, d=12, k=9, r=3, seed=6)
    a64, b64 = stack.A.double(), stack.scaled_B.double()
    U, V = hosvd(a64, b64, 4)
    errors = [squared_error(a64, b64, full_cores(a64, b64, U, V))]
    for _ in range(10):
        U, V = hooi_sweep(a64, b64, V)
        errors.append(squared_error(a64, b64, full_cores(a64, b64, U, V)))
    if core == "diagonal":
        s = diagonal_cores(a64, b64, U, V)
        errors = [squared_error(a64, b64, s)]
        for _ in range(10):
            U, V, s = procrustes_sweep(a64, b64, V, s)
            errors.append(squared_error(a64, b64, s))
    seq = torch.stack(errors)  # (sweeps + 1, G)
    assert bool((seq[1:] <= seq[:-1] * (1 + 1e-12) + 1e-12).all())
    assert bool((seq[-1] < seq[0]).any())  # the sweeps do something on random adapters


@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_squared_error_is_the_dense_error(core):
    stack = random_stack(G=2, K=3, d=8, k=7, r=2, seed=7)
    out = closed_form(stack.A, stack.scaled_B, 3, core)
    assert torch.allclose(
        out.squared_error.double(), dense_error(dense(stack), out.delta()), rtol=1e-4
    )


@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_export_round_trip_is_exact(core):
    stack = random_stack(G=2, K=3, d=8, k=7, r=2, seed=8)
    out = closed_form(stack.A, stack.scaled_B, 3, core)
    scale = torch.tensor([[2.0, 0.5, 4.0 / 3.0], [1.0, 8.0, 0.25]])  # PEFT's alpha / R per task
    B, A = export_lora(out.U, out.V, out.cores, scale)
    assert B.shape == (2, 3, 8, 3) and A.shape == (2, 3, 7)
    restored = scale[:, :, None, None] * (B @ A[:, None])  # what PEFT computes
    assert torch.allclose(restored, out.delta(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("distance", ["mae", "fro", "cos"])
@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_refinement_is_never_worse_than_its_start(distance, core):
    stack = random_stack(G=3, K=4, d=10, k=8, r=3, seed=9)
    start = closed_form(stack.A, stack.scaled_B, 2, core)
    delta = dense(stack).float()
    before = refine_basis(start, delta, distance=distance, steps=0, lr=0.02)
    for lr in (0.02, 50.0):  # a sane and an absurd learning rate
        after = refine_basis(start, delta, distance=distance, steps=15, lr=lr)
        assert after.measured is not None and before.measured is not None
        assert bool((after.measured.error.mean(1) <= before.measured.error.mean(1)).all())
        # the reported errors are the returned factors' errors
        f = get_distance(distance)
        assert torch.allclose(after.measured.error, f(delta, after.delta()), rtol=1e-4, atol=1e-7)
    sane = refine_basis(start, delta, distance=distance, steps=30, lr=0.02)
    assert bool((sane.measured.error.mean(1) < before.measured.error.mean(1)).any())


def test_fit_measures_on_the_distance():
    stack = random_stack(G=2, K=3, d=8, k=7, r=2, seed=10)
    out = fit_shared_basis(stack.A, stack.scaled_B, 2, distance="mae")
    assert out.measured is not None
    assert torch.allclose(
        out.measured.error, get_distance("mae")(dense(stack).float(), out.delta())
    )
    assert torch.allclose(out.measured.zero, dense(stack).abs().mean(dim=(-2, -1)).float())


def test_rank_out_of_range_is_refused():
    stack = random_stack(G=1, K=2, d=6, k=5, r=2)
    with pytest.raises(ValueError, match="min\\(d, k\\) = 5"):
        closed_form(stack.A, stack.scaled_B, 6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of --rank"),
        ({"rank": 4, "budget": 10.0}, "exactly one of --rank"),
        ({"rank": 0}, "--rank must be >= 1"),
        ({"budget": 0.0}, "percentage"),
        ({"budget": 120.0}, "percentage"),
        ({"rank": 4, "core": "block"}, "core must be"),
        ({"rank": 4, "distance": "l3"}, "distance must be"),
        ({"rank": 4, "sweeps": -1}, "sweeps"),
        ({"rank": 4, "refine_lr": 0.0}, "refine_lr"),
    ],
)
def test_config_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        SharedBasisConfig(**options)


def test_cp_sweeps_never_increase_the_error_and_beat_orthonormal():
    """Diagonal cores with free U, V (CP-ALS): monotone, and at most the orthonormal error."""
    stack = random_stack(G=3, K=5, d=12, k=9, r=3, seed=13)
    a64, b64 = stack.A.double(), stack.scaled_B.double()
    ortho = closed_form(a64, b64, 4, "diagonal", sweeps=8)
    U, V, s = ortho.U, ortho.V, ortho.cores
    errors = [cp_squared_error(a64, b64, U, V, s)]
    assert torch.allclose(errors[0], ortho.squared_error, rtol=1e-9)
    for _ in range(15):
        U, V, s = cp_sweep(a64, b64, U, V, s)
        errors.append(cp_squared_error(a64, b64, U, V, s))
    seq = torch.stack(errors)
    assert bool((seq[1:] <= seq[:-1] * (1 + 1e-10) + 1e-12).all())
    assert bool((seq[-1] < 0.99 * seq[0]).all())
    assert torch.allclose(U.norm(dim=1), torch.ones(3, 4, dtype=torch.float64))


def test_cp_error_formula_is_the_dense_error():
    stack = random_stack(G=2, K=3, d=8, k=7, r=2, seed=14)
    out = closed_form(stack.A.double(), stack.scaled_B.double(), 3, "diagonal", cp_sweeps=10)
    assert torch.allclose(out.squared_error, dense_error(dense(stack), out.delta()), rtol=1e-9)
    # and the export of a non-orthonormal basis is still exact
    scale = torch.full((2, 3), 2.0, dtype=torch.float64)
    B, A = export_lora(out.U, out.V, out.cores, scale)
    assert torch.allclose(2.0 * B @ A[:, None], out.delta(), rtol=1e-12)


def test_sweep_tolerance_stops_each_module_on_its_own():
    """With a tolerance, module g's factors are those of sweeping it alone until its own squared
    error drops by <= tol, whatever modules share its group; tol = 0 runs every sweep."""
    stack = random_stack(G=3, K=5, d=12, k=9, r=3, seed=8)
    a64, b64 = stack.A.double(), stack.scaled_B.double()
    tol = 1e-3
    grouped = closed_form(a64, b64, 4, "full", sweeps=30, tol=tol)
    stops = []
    for g in range(3):
        A, B = a64[g : g + 1], b64[g : g + 1]
        _, V = hosvd(A, B, 4)
        before = math.inf
        n = 0
        while n < 30:  # the reference: its own loop, its own stopping sweep (the second or later)
            n += 1
            U, V = hooi_sweep(A, B, V)
            after = float(squared_error(A, B, full_cores(A, B, U, V))[0])
            if n > 1 and before - after <= tol * before:
                break
            before = after
        stops.append(n)
        alone = closed_form(A, B, 4, "full", sweeps=n)
        torch.testing.assert_close(grouped.delta()[g], alone.delta()[0], atol=1e-12, rtol=1e-10)
        assert float(grouped.squared_error[g]) == pytest.approx(float(alone.squared_error[0]))
    assert min(stops) < 30 and len(set(stops)) > 1  # modules stopped early, at different sweeps
    exact = closed_form(a64, b64, 4, "full", sweeps=30)  # tol = 0: all 30 sweeps
    assert bool((exact.squared_error <= grouped.squared_error * (1 + 1e-12)).all())


@pytest.mark.parametrize(("d", "k"), [(10, 16), (16, 10)])  # K r = 12: one side many-task wide
def test_float32_many_tasks_agrees_with_float64(d, k):
    """Float32 adapters with K r > min(d, k) are fitted in float32 (working_dtype), the narrow
    side's small Gram in float64: same squared error as the float64 fit to float32 rounding, and
    orthonormal U, V."""
    stack = random_stack(G=2, K=4, d=d, k=k, r=3, seed=21)
    lo = closed_form(stack.A, stack.scaled_B, 5, "full", sweeps=3)
    hi = closed_form(stack.A.double(), stack.scaled_B.double(), 5, "full", sweeps=3)
    assert lo.U.dtype == torch.float32
    torch.testing.assert_close(lo.squared_error.double(), hi.squared_error, rtol=1e-5, atol=0)
    eye = torch.eye(5, dtype=torch.float64)
    for basis in (lo.U, lo.V):
        gram = basis.double().transpose(1, 2) @ basis.double()
        torch.testing.assert_close(gram, eye.expand_as(gram), atol=1e-5, rtol=0)
