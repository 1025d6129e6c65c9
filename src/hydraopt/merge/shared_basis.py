"""A two-sided shared basis per module: ΔW_i ≈ U S_i Vᵀ (Tucker-2 over the task axis).

HydraOpt shares one side (A') and keeps whole heads B' (d x r each). Here both sides are shared:
U (d, R) and V (k, R) with orthonormal columns are stored once per module, and each task keeps
only an R x R core S_i (``core="full"``) or R numbers (``core="diagonal"``, joint
diagonalisation). This is the model of "Compress then Serve" (ICML 2025) and of JD-LoRA style
joint diagonalisation; storage per module is d R + k R + K R² (or K R).

Closed form for the squared Frobenius error Σ_i ||ΔW_i - U S_i Vᵀ||², from the factors alone
(ΔW_i = B_i A_i with the LoRA scale folded into B_i; nothing of size d x k is formed):

1. HOSVD start: U = top-R left singular vectors of [ΔW_1 ... ΔW_K] (d x K k). Since
   ΔW_i ΔW_iᵀ = (B_i R_iᵀ)(B_i R_iᵀ)ᵀ with A_iᵀ = Q_i R_i, these are the top-R left singular
   vectors of the d x K r matrix [B_1 R_1ᵀ ... B_K R_Kᵀ]. V likewise from [A_iᵀ R'_iᵀ], B_i = Q'_i R'_i.
2. Alternating sweeps (HOOI / Tucker-2): for orthonormal U, V the best cores are S_i = Uᵀ ΔW_i V
   and the error is Σ||ΔW_i||² - Σ||S_i||². U <- top-R left singular vectors of
   [ΔW_1 V ... ΔW_K V] (d x K R, each ΔW_i V = B_i (A_i V)) maximises Σ||S_i||² for that V
   exactly, then V likewise: the error never increases.
3. Diagonal cores: S_i = diag(s_i). For orthonormal U, V the rank-one terms u_j v_jᵀ are
   orthonormal, so the least-squares s_i = diag(Uᵀ ΔW_i V). Start from the full-core solution
   rotated by the common eigenvectors of Σ S_i S_iᵀ and Σ S_iᵀ S_i (exact when the tasks share a
   singular basis), then block-coordinate sweeps: U <- polar(Σ_i ΔW_i V D_i) (orthogonal
   Procrustes, the exact minimiser for fixed V and D), V likewise, D <- least squares. Monotone.
   Orthonormal U, V are a real restriction here (on the real adapters they leave twice the
   full-core error at the same R), so the diagonal model then drops it: ΔW_i ≈ U diag(s_i) Vᵀ
   with free U, V is a rank-R CP (PARAFAC) decomposition of the d x k x K tensor, and CP-ALS
   sweeps (U, V, then every s_i by exact least squares, all from the factors) lower the error
   further, monotonically. Columns of U and V are kept at unit norm (the norms go into s).

All functions are batched over a group axis G of same-shaped modules and the task axis K; small
Grams run in float64 so the exactness guarantees hold for float32 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydraopt.errors import HydraoptError
from hydraopt.merge.closed_form import single_thread, top_eigenpairs, total_energy
from hydraopt.merge.shared_basis_config import CORES, Core, SharedBasisConfig
from hydraopt.types import Measured

# Up to this size a full float64 eigh is the cheaper top-R solver: at n = 576 (SmolLM2) eigh
# takes 0.05 CPU s for any R, while block subspace iteration (top_eigenpairs) took 0.10 / 0.22
# / 0.64 s for R = 16 / 64 / 186 (measured, issue 18); above it eigh grows like n³ (3 s at 2048).
EIGH_UP_TO = 1024

# The config lives torch-free in shared_basis_config (the registry declares it without torch).
__all__ = ["CORES", "Core", "SharedBasisConfig"]


@dataclass(frozen=True)
class MergedBasisStack:
    """A shared basis for G same-shaped modules of K tasks (one R for the group).

    Attributes:
        U: (G, d, R) shared left basis: orthonormal columns (full cores) or unit-norm columns
            (diagonal cores, a CP decomposition).
        V: (G, k, R) shared right basis.
        cores: (G, K, R, R) full cores or (G, K, R) diagonal ones; LoRA scale folded in.
        squared_error: (G,) Σ_i ||ΔW_i - U S_i Vᵀ||² of the returned factors.
        measured: the per-task errors on the config's distance, if measured.
    """

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    squared_error: torch.Tensor
    measured: Measured | None = None

    @property
    def core(self) -> Core:
        return "diagonal" if self.cores.dim() == 3 else "full"

    @property
    def rank(self) -> int:
        return int(self.U.shape[-1])

    def heads(self) -> torch.Tensor:
        """U S_i per task, (G, K, d, R): each task's B' over the shared A' = Vᵀ."""
        return task_heads(self.U, self.cores)

    def delta(self) -> torch.Tensor:
        """Dense U S_i Vᵀ, (G, K, d, k). Only for small shapes and tests."""
        return self.heads() @ self.V.transpose(1, 2)[:, None]


def task_heads(U: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """U S_i (G, K, d, R) from U (G, d, R) and full (G, K, R, R) or diagonal (G, K, R) cores."""
    if cores.dim() == 3:
        return U[:, None] * cores[:, :, None, :]
    return U[:, None] @ cores


def export_lora(
    U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task as a standard rank-R LoRA: B_i = U S_i / scale_i, A = Vᵀ.

    PEFT computes scale_i B_i A, so the exported adapter restores U S_i Vᵀ exactly (up to the
    rounding of the division).

    Args:
        U: (G, d, R); V: (G, k, R); cores: (G, K, R, R) or (G, K, R).
        scale: (G, K) the scale PEFT will apply to the exported adapter (its lora_alpha / R, or
            / sqrt(R) with rsLoRA), not the input adapters' scale.

    Returns:
        B (G, K, d, R) and A (G, R, k), the same A for every task.
    """
    B = task_heads(U, cores) / scale[:, :, None, None]
    return B, V.transpose(1, 2).contiguous()


def top_eigh(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of symmetric PSD mat (G, n, n): eigh up to :data:`EIGH_UP_TO`."""
    if mat.shape[1] > EIGH_UP_TO:
        return top_eigenpairs(mat, rank)
    with single_thread():  # one batched LAPACK call: threads only spin (see single_thread)
        vals, vecs = torch.linalg.eigh(mat)  # ascending
    return vals.flip(1)[:, :rank], vecs.flip(2)[:, :, :rank]


def top_left_singular(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors (G, n, R) of x (G, n, m) and their σ² (G, R).

    Through the smaller Gram: xᵀx (m x m, then U = x w / σ) when m <= n, else x xᵀ (in x's
    dtype: float32 for many tasks, see :func:`working_dtype`). Directions with no energy (a
    rank-deficient x) are completed to an orthonormal set: they carry nothing, but the cores
    and the export need R orthonormal columns.
    """
    G, n, m = x.shape
    if m <= n:
        # The small m x m Gram in float64 whatever x's dtype: U = x w / σ needs σ accurate
        # down to the 1e-10 cut, or near-empty directions come out non-orthonormal.
        x64 = x.to(torch.float64)
        vals, w = top_eigh(x64.transpose(1, 2) @ x64, min(rank, m))  # (G, R'), (G, m, R')
        vals = vals.clamp_min(0.0)
        sigma = vals.sqrt()
        tiny = sigma <= sigma[:, :1].clamp_min(1e-300) * 1e-10
        u = (x64 @ w) / torch.where(tiny, 1.0, sigma)[:, None, :]  # (G, n, R')
        u = torch.where(tiny[:, None, :], 0.0, u).to(x.dtype)
        vals = vals.to(x.dtype)
    else:
        vals, u = top_eigh(x @ x.transpose(1, 2), rank)
        vals = vals.clamp_min(0.0)
        tiny = vals.sqrt() <= vals[:, :1].sqrt().clamp_min(1e-300) * 1e-10
    if u.shape[2] < rank:  # fewer columns in x than R: pad with empty directions
        pad = rank - u.shape[2]
        u = torch.cat([u, u.new_zeros(G, n, pad)], dim=2)
        vals = torch.cat([vals, vals.new_zeros(G, pad)], dim=1)
        tiny = torch.cat([tiny, tiny.new_ones(G, pad)], dim=1)
    if bool(tiny.any()):
        u = _complete_orthonormal(u, tiny)
    return u, vals


def _complete_orthonormal(u: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Replace the ``empty`` (trailing) columns of u (G, n, R) so that all R are orthonormal.

    The kept columns are already orthonormal and come first, so QR returns them unchanged up to
    sign, which is restored from R's diagonal. A fixed-seed generator: no global RNG.
    """
    gen = torch.Generator(device=u.device).manual_seed(0)
    noise = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=u.device)
    filled = torch.where(empty[:, None, :], noise, u)
    q, r = torch.linalg.qr(filled)
    sign = torch.sign(torch.diagonal(r, dim1=1, dim2=2))
    return q * torch.where(sign == 0, 1.0, sign)[:, None, :]


def triangular_factor(x: torch.Tensor) -> torch.Tensor:
    """R (..., m, m) of x = Q R for x (..., n, m), without Q, on one thread.

    Batched QR over K tasks gains nothing from threads: with two threads on a busy 2-core
    machine it took 0.4-0.8 CPU s for K = 100 576 x 32 blocks, on one 0.03 s (measured, issue
    18; the same spin-waiting as :func:`~hydraopt.merge.closed_form.single_thread` describes).
    """
    with single_thread():
        return torch.linalg.qr(x, mode="r").R


def hosvd(A: torch.Tensor, scaled_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HOSVD start: U (G, d, R) and V (G, k, R) from the factors A (G, K, r, k), B (G, K, d, r)."""
    return hosvd_left(A, scaled_B, rank), hosvd_right(A, scaled_B, rank)


def hosvd_left(A: torch.Tensor, scaled_B: torch.Tensor, rank: int) -> torch.Tensor:
    """U (G, d, R) of the HOSVD: top-R left singular vectors of [ΔW_1 ... ΔW_K]."""
    G, K, r, _ = A.shape
    # ΔW_i ΔW_iᵀ = B_i (A_i A_iᵀ) B_iᵀ = (B_i R_iᵀ)(B_i R_iᵀ)ᵀ with A_iᵀ = Q_i R_i.
    r_a = triangular_factor(A.transpose(-1, -2))  # (G, K, r, r)
    left = scaled_B @ r_a.transpose(-1, -2)  # (G, K, d, r)
    d = scaled_B.shape[2]
    return top_left_singular(left.permute(0, 2, 1, 3).reshape(G, d, K * r), rank)[0]


def hosvd_right(A: torch.Tensor, scaled_B: torch.Tensor, rank: int) -> torch.Tensor:
    """V (G, k, R) of the HOSVD: top-R right singular vectors of [ΔW_1; ...; ΔW_K]."""
    G, K, r, k = A.shape
    r_b = triangular_factor(scaled_B)  # (G, K, r, r): ΔW_iᵀ ΔW_i = A_iᵀ R_bᵀ R_b A_i
    right = A.transpose(-1, -2) @ r_b.transpose(-1, -2)  # (G, K, k, r)
    return top_left_singular(right.permute(0, 2, 1, 3).reshape(G, k, K * r), rank)[0]


def full_cores(
    A: torch.Tensor, scaled_B: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """S_i = Uᵀ ΔW_i V = (Uᵀ B_i)(A_i V), (G, K, R, R): the least-squares cores for orthonormal U, V."""
    return (U.transpose(1, 2)[:, None] @ scaled_B) @ (A @ V[:, None])


def diagonal_cores(
    A: torch.Tensor, scaled_B: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """s_i = diag(Uᵀ ΔW_i V), (G, K, R): least squares for orthonormal U, V."""
    ub = U.transpose(1, 2)[:, None] @ scaled_B  # (G, K, R, r)
    av = A @ V[:, None]  # (G, K, r, R)
    return torch.einsum("gkjr,gkrj->gkj", ub, av)


def hooi_sweep(
    A: torch.Tensor,
    scaled_B: torch.Tensor,
    V: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Tucker-2 sweep: U for the given V, then V for that U (each an exact maximiser).

    U's columns are the top left singular vectors of [ΔW_1 V ... ΔW_K V] (d x K R). Only its
    Gram matters, and for R > r, ΔW_i V = B_i (A_i V) has the Gram of B_i L_i with
    (A_i V)(A_i V)ᵀ = L_i L_iᵀ (L_i r x r, from a QR), so the d x K min(r, R) matrix is used:
    half the Gram's cost at R = 2 r (as in :func:`hosvd`).
    """
    G, K, r, k = A.shape
    d, R = scaled_B.shape[2], V.shape[2]
    av = _narrow(A @ V[:, None])  # (G, K, r, min(r, R))
    proj = scaled_B @ av  # (G, K, d, min(r, R)): ΔW_i V, or a factor of its Gram
    width = av.shape[-1]
    U, _ = top_left_singular(proj.permute(0, 2, 1, 3).reshape(G, d, K * width), R)
    bu = _narrow(scaled_B.transpose(-1, -2) @ U[:, None])  # (G, K, r, min(r, R))
    back = A.transpose(-1, -2) @ bu  # (G, K, k, min(r, R)): ΔW_iᵀ U, or a Gram factor
    V, _ = top_left_singular(back.permute(0, 2, 1, 3).reshape(G, k, K * width), R)
    return U, V


def _narrow(x: torch.Tensor) -> torch.Tensor:
    """x (..., r, R) itself when R <= r, else L (..., r, r) with L Lᵀ = x xᵀ (QR of xᵀ)."""
    if x.shape[-1] <= x.shape[-2]:
        return x
    return triangular_factor(x.transpose(-1, -2)).transpose(-1, -2)


def polar(c: torch.Tensor) -> torch.Tensor:
    """The orthonormal Q maximising tr(Qᵀ c) for c (G, n, R): P Wᵀ from c = P Σ Wᵀ."""
    p, _, wh = torch.linalg.svd(c, full_matrices=False)
    return p @ wh


def procrustes_sweep(
    A: torch.Tensor, scaled_B: torch.Tensor, V: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One diagonal-core sweep: U, then V (orthogonal Procrustes), then s (least squares).

    With orthonormal U, V: Σ||ΔW_i - U D_i Vᵀ||² = const - 2 tr(Uᵀ Σ_i ΔW_i V D_i) + Σ||D_i||²,
    so for fixed V and D the best U is polar(Σ_i ΔW_i V D_i), and likewise for V.
    """
    c_u = (scaled_B @ (A @ V[:, None]) * s[:, :, None, :]).sum(1)  # (G, d, R)
    U = polar(c_u)
    c_v = (A.transpose(-1, -2) @ (scaled_B.transpose(-1, -2) @ U[:, None]) * s[:, :, None, :]).sum(
        1
    )
    V = polar(c_v)  # (G, k, R)
    return U, V, diagonal_cores(A, scaled_B, U, V)


def diagonalising_rotation(
    U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate U, V by the eigenvectors of Σ S_i S_iᵀ and Σ S_iᵀ S_i (paired by eigenvalue).

    If S_i = P D_i Qᵀ for all i, both sums share the eigenvalues Σ D_i², so the rotated cores are
    exactly diagonal; otherwise a good start for the Procrustes sweeps.
    """
    _, p = top_eigenpairs((cores @ cores.transpose(-1, -2)).sum(1), U.shape[2])  # (G, R, R)
    _, q = top_eigenpairs((cores.transpose(-1, -2) @ cores).sum(1), V.shape[2])
    return U @ p, V @ q


def _solve_right(c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """c h⁻¹ for c (G, n, R) and symmetric PSD h (G, R, R), with a relative 1e-12 ridge.

    The ridge only matters for an empty direction (h singular), where it returns zeros instead
    of a failure; elsewhere it moves the least-squares solution by ~1e-12 relative.
    """
    ridge = h.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300) * 1e-12  # (G,)
    eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    return torch.linalg.solve(h + ridge[:, None, None] * eye, c.transpose(1, 2)).transpose(1, 2)


def cp_sweep(
    A: torch.Tensor, scaled_B: torch.Tensor, U: torch.Tensor, V: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CP-ALS sweep for ΔW_i ≈ U diag(s_i) Vᵀ with free U (G, d, R), V (G, k, R), s (G, K, R).

    Each step is an exact least-squares solve, so the error never increases:
    U = (Σ_i ΔW_i V D_i)(VᵀV ∘ Σ_i s_i s_iᵀ)⁻¹, V likewise, s_i = (UᵀU ∘ VᵀV)⁻¹ diag(Uᵀ ΔW_i V).
    Then columns of U and V are scaled to unit norm, the norms moved into s (same product).
    """
    ss = s.transpose(1, 2) @ s  # (G, R, R): Σ_i s_i s_iᵀ
    c_u = (scaled_B @ (A @ V[:, None]) * s[:, :, None, :]).sum(1)  # (G, d, R)
    U = _solve_right(c_u, (V.transpose(1, 2) @ V) * ss)
    c_v = (A.transpose(-1, -2) @ (scaled_B.transpose(-1, -2) @ U[:, None]) * s[:, :, None, :]).sum(
        1
    )
    V = _solve_right(c_v, (U.transpose(1, 2) @ U) * ss)  # (G, k, R)
    h = (U.transpose(1, 2) @ U) * (V.transpose(1, 2) @ V)  # (G, R, R)
    s = _solve_right(diagonal_cores(A, scaled_B, U, V), h)  # (G, K, R): h is symmetric
    nu, nv = U.norm(dim=1).clamp_min(1e-300), V.norm(dim=1).clamp_min(1e-300)  # (G, R)
    return U / nu[:, None], V / nv[:, None], s * (nu * nv)[:, None]


def cp_squared_error(
    A: torch.Tensor, scaled_B: torch.Tensor, U: torch.Tensor, V: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Σ_i ||ΔW_i - U diag(s_i) Vᵀ||² (G,) for any U, V, from the factors.

    = Σ_i ||ΔW_i||² - 2 s_iᵀ diag(Uᵀ ΔW_i V) + s_iᵀ (UᵀU ∘ VᵀV) s_i.
    """
    h = (U.transpose(1, 2) @ U) * (V.transpose(1, 2) @ V)  # (G, R, R)
    cross = (s * diagonal_cores(A, scaled_B, U, V)).sum(dim=(1, 2))
    quad = ((s @ h) * s).sum(dim=(1, 2))
    return (total_energy(A, scaled_B) - 2 * cross + quad).clamp_min(0.0)


def squared_error(
    A: torch.Tensor, scaled_B: torch.Tensor, cores: torch.Tensor, energy: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_i ||ΔW_i||² - Σ_i ||S_i||² (G,): the error of least-squares cores on orthonormal U, V."""
    if energy is None:
        energy = total_energy(A, scaled_B)
    kept = cores.to(energy.dtype).square().flatten(1).sum(1)
    return (energy - kept).clamp_min(0.0)


def working_dtype(A: torch.Tensor, d: int, k: int) -> torch.dtype:
    """float64, or A's own dtype where the tasks outnumber the module's width (K r > min(d, k)).

    Few tasks (K r <= d, k): every Gram is K r x K r or smaller and float64 costs nothing, so
    the exactness guarantees hold to float64 for float32 adapters. Many tasks: the d x d and
    k x k Grams of d x K r matrices, their eigh and the products around them were the whole
    cost (K = 100 at SmolLM2 shape, issue 18), and float32 halves it; the errors that steer
    the sweeps and the budget (energies summed in float64) move by ~1e-6 relative, far below
    the sweeps' 1e-3 stopping tolerance.
    """
    K, r = A.shape[1], A.shape[2]
    return A.dtype if K * r > min(d, k) else torch.float64


def closed_form(
    A: torch.Tensor,
    scaled_B: torch.Tensor,
    rank: int,
    core: Core = "full",
    sweeps: int = 8,
    cp_sweeps: int = 0,
    tol: float = 0.0,
) -> MergedBasisStack:
    """U, V and the cores minimising the squared Frobenius error (HOSVD + sweeps).

    In float64, or for many tasks in A's dtype (:func:`working_dtype`); diagonal cores always
    continue in float64.

    Args:
        A: (G, K, r, k); scaled_B: (G, K, d, r), LoRA scale folded in.
        rank: R, at most min(d, k).
        core: ``full`` or ``diagonal``.
        sweeps: alternating sweeps after the HOSVD start (diagonal: as many Procrustes sweeps
            again after the full-core ones, then ``cp_sweeps`` CP-ALS sweeps).
        cp_sweeps: diagonal cores: CP-ALS sweeps with free U, V (0: orthonormal U, V).
        tol: a module stops sweeping once a sweep (the second or later) lowers its squared
            error by less than ``tol`` of it (0: always ``sweeps`` sweeps); the loop ends when
            all have stopped.

    Returns:
        The stack in A's dtype; ``squared_error`` from the float64 factors.
    """
    G, K, r, k = A.shape
    d = scaled_B.shape[2]
    if not 1 <= rank <= min(d, k):
        raise HydraoptError(f"rank R must be in [1, min(d, k) = {min(d, k)}], got {rank}")
    work = working_dtype(A, d, k)
    a, b = A.to(work), scaled_B.to(work)
    energy = total_energy(A.to(torch.float64), scaled_B.to(torch.float64))  # (G,)
    # A sweep's U step reads only V, so with sweeps the HOSVD's U is never used: it is not
    # computed (a d x d Gram and its eigh). The first sweep always runs; the tolerance then
    # compares each sweep with the one before.
    V = hosvd_right(a, b, rank)
    if sweeps == 0:
        U = hosvd_left(a, b, rank)
        cores = full_cores(a, b, U, V)  # (G, K, R, R)
    done = torch.zeros_like(energy, dtype=torch.bool)  # (G,) modules whose sweeps stopped
    before = energy  # (G,) the previous sweep's squared error, set by the first sweep
    for i in range(sweeps):
        new_U, new_V = hooi_sweep(a, b, V)
        # A stopped module keeps its factors, so each module's result is the one it gets alone,
        # whatever group (chunk) the engine put it in.
        U = new_U if i == 0 else torch.where(done[:, None, None], U, new_U)
        V = torch.where(done[:, None, None], V, new_V)
        cores = full_cores(a, b, U, V)
        if tol > 0:
            after = squared_error(a, b, cores, energy)
            if i > 0:
                # Later sweeps gain less than this one did (measured on SmolLM2-shape modules:
                # relative drops 2e-3, 6e-4, 5e-4, 3e-4, ... at R = 16; < 1e-5 at R = 64).
                done |= before - after <= tol * before
                if bool(done.all()):
                    break
            before = after
    a64, b64 = A.to(torch.float64), scaled_B.to(torch.float64)
    U, V, cores = U.to(torch.float64), V.to(torch.float64), cores.to(torch.float64)
    if core == "diagonal":
        U, V = diagonalising_rotation(U, V, cores)
        cores = diagonal_cores(a64, b64, U, V)
        for _ in range(sweeps):
            U, V, cores = procrustes_sweep(a64, b64, V, cores)
        for _ in range(cp_sweeps):
            U, V, cores = cp_sweep(a64, b64, U, V, cores)
    if core == "diagonal" and cp_sweeps > 0:
        err = cp_squared_error(a64, b64, U, V, cores)
    else:
        err = squared_error(a64, b64, cores, energy)
    dtype = A.dtype
    return MergedBasisStack(U.to(dtype), V.to(dtype), cores.to(dtype), err.to(dtype))
