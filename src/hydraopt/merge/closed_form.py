"""Closed-form HydraOpt for the squared Frobenius distance, from the factors alone.

With tasks grouped by a routing W (task i -> head c, n_c tasks per head) and a fixed A' with
orthonormal rows, the best head is the mean projected update B'_c = mean_{i in c} B_i A_i A'^T,
and the error is

    sum_i ||B_i A_i||^2 - sum_c n_c ||mean_{i in c} B_i A_i A'^T||^2.

So the best A' spans the top-r eigenvectors of  G_W = sum_c n_c Dbar_c^T Dbar_c  (k x k). We never
form it: G_W = Acat^T H Acat with Acat the stacked A_i (Kr x k) and H = (P kron 1) o (B_i^T B_j)
(Kr x Kr), P = W diag(1/n) W^T. With H = L L^T the nonzero spectrum of G_W is that of
L^T (Acat Acat^T) L, a Kr x Kr matrix. For M = K (P = I) this is exactly "A' = top-r right singular
vectors of the stacked R_i A_i, B_i = Q_i R_i". Nothing of size d x k is ever formed.

All functions are batched over a leading group axis G. Small Gram matrices are handled in float64
so that the 1e-6 reproduction guarantees hold for float32 inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run small LAPACK calls on one thread.

    Batched eigh on tiny matrices gains nothing from threads, and with OpenMP's spin-waiting it
    slows down 100x or more when another process holds a core (measured: 5 s instead of 0.03 s
    for 50 64x64 problems on a busy 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def routing_matrix(
    routing: torch.Tensor, num_heads: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """P = W diag(1/n) W^T (G, K, K): 1/n_c between tasks sharing head c, else 0."""
    onehot = torch.nn.functional.one_hot(routing, num_heads).to(dtype)  # (G, K, M)
    counts = onehot.sum(dim=1).clamp_min(1.0)  # (G, M)
    return (onehot / counts[:, None, :]) @ onehot.transpose(1, 2)


SUBSPACE_FROM = 256  # matrix size from which top-r eigenpairs come from subspace iteration
SUBSPACE_MAX_ITER = 30


def top_eigenpairs(mat: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenvalues (G, r), descending, and eigenvectors (G, n, r) of symmetric PSD ``mat``.

    Adapters trained from one init share most of their row space, so G_W has a wide gap after
    its r-th eigenvalue (lambda_{r+1} / lambda_r = 0.02-0.04 on the Llama-3.2-1B-shaped sets):
    block subspace iteration with Rayleigh-Ritz then converges in a few O(n^2 r) steps, where a
    full eigh costs O(n^3) (3 s for n = 2048 in float64 on one core). A module stops once the
    residual of each of its top-r Ritz pairs is below sqrt(eps) of its largest eigenvalue
    (eigenvalues then exact to ~eps); modules still short of it after SUBSPACE_MAX_ITER steps (a
    flat spectrum) take eigh, so the result is eigh's to that tolerance either way.
    """
    G, n, _ = mat.shape
    if n < SUBSPACE_FROM or 2 * r >= n:
        return _top_eigh(mat, r)
    width = r + max(8, r // 4)  # a few extra columns speed up the r-th pair's convergence
    tol = torch.finfo(mat.dtype).eps ** 0.5
    vals = mat.new_empty(G, r)
    vecs = mat.new_empty(G, n, r)
    gen = torch.Generator(device=mat.device).manual_seed(0)
    start = torch.randn(G, n, width, generator=gen, dtype=mat.dtype, device=mat.device)
    todo, pending = torch.arange(G, device=mat.device), mat
    basis = torch.linalg.qr(mat @ start).Q
    for _ in range(SUBSPACE_MAX_ITER):
        image = pending @ basis  # (g, n, width)
        small = basis.transpose(1, 2) @ image
        with single_thread():
            theta, rot = torch.linalg.eigh((small + small.transpose(1, 2)) / 2)
        theta, rot = theta.flip(-1)[:, :r], rot.flip(-1)[:, :, :r]
        ritz, mapped = basis @ rot, image @ rot  # Ritz vectors and mat times them
        residual = (mapped - ritz * theta[:, None, :]).norm(dim=1)  # (g, r)
        done = (residual <= tol * theta[:, :1].clamp_min(0.0)).all(dim=1)
        vals[todo[done]], vecs[todo[done]] = theta[done], ritz[done]
        if bool(done.all()):
            return vals, vecs
        if bool(done.any()):
            todo, image, pending = todo[~done], image[~done], mat[todo[~done]]
        basis = torch.linalg.qr(image).Q
    vals[todo], vecs[todo] = _top_eigh(pending, r)
    return vals, vecs


def _top_eigh(mat: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs, descending, from a full eigh (one thread: see :func:`single_thread`)."""
    with single_thread():
        evals, evecs = torch.linalg.eigh(mat)  # ascending
    return evals[:, -r:].flip(-1), evecs[:, :, -r:].flip(-1)


def _psd_sqrt_factor(h: torch.Tensor) -> torch.Tensor:
    """L with L L^T = h for symmetric PSD h (G, n, n); tiny negative eigenvalues clipped."""
    with single_thread():
        evals, evecs = torch.linalg.eigh(h)
    return evecs * evals.clamp_min(0.0).sqrt()[:, None, :]


def shared_a(
    A: torch.Tensor,
    scaled_B: torch.Tensor,
    routing: torch.Tensor,
    num_heads: int,
    *,
    path: str = "auto",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best A' for a fixed routing under the squared Frobenius distance.

    Two exact paths to the same top-r eigenvectors of G_W (k x k): through the Kr x Kr
    factor-space problem when K r <= k (a handful of adapters on a wide model), or through G_W
    itself when K r > k (many adapters), which keeps memory at O(k^2) instead of O((K r)^2).

    Args:
        A: (G, K, r, k) the adapters' A.
        scaled_B: (G, K, d, r) the adapters' B with the LoRA scale folded in.
        routing: (G, K) head index per task.
        num_heads: M.
        path: ``auto``, ``factors`` (Kr x Kr) or ``gram`` (k x k); for tests and benchmarks.
        dtype: working precision (float64 by default; the routing search of many adapters uses
            float32, then recomputes its winner in float64).

    Returns:
        A' (G, r, k) with orthonormal rows, and the squared error (G,) of the best heads.
    """
    G, K, r, k = A.shape
    use_gram = path == "gram" or (path == "auto" and K * r > k)
    if use_gram and dtype == torch.float64 and A.dtype == torch.float32 and K >= FLOAT32_GRAM_FROM:
        vals, a_prime, total = _top_eigen_gram_float32_products(A, scaled_B, routing, num_heads, r)
        return a_prime.to(A.dtype), (total - vals.sum(-1)).clamp_min(0.0)
    a64, b64 = A.to(dtype), scaled_B.to(dtype)
    if use_gram:
        vals, a_prime = _top_eigen_gram(a64, b64, routing, num_heads, r)
    else:
        vals, a_prime = _top_eigen_factors(a64, b64, routing, num_heads, r)
    total = total_energy(a64, b64)
    return a_prime.to(A.dtype), (total - vals.sum(-1)).clamp_min(0.0)


def _top_eigen_factors(
    a64: torch.Tensor, b64: torch.Tensor, routing: torch.Tensor, m: int, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of G_W through the Kr x Kr problem L^T (Acat Acat^T) L, H = L L^T."""
    G, K, _, k = a64.shape
    cross = torch.einsum("gidr,gjds->girjs", b64, b64)  # (G, K, r, K, r): B_i^T B_j
    P = routing_matrix(routing, m, a64.dtype)  # (G, K, K), in the working precision
    H = (cross * P[:, :, None, :, None]).reshape(G, K * r, K * r)
    acat = a64.reshape(G, K * r, k)
    L = _psd_sqrt_factor(H)  # (G, Kr, Kr)
    small = L.transpose(1, 2) @ (acat @ acat.transpose(1, 2)) @ L  # (G, Kr, Kr)
    top_vals, top_vecs = top_eigenpairs(small, r)  # (G, r), (G, Kr, r)
    top_vals = top_vals.clamp_min(0.0)
    # right singular vectors v = S^T u / sigma with S = L^T Acat
    v = acat.transpose(1, 2) @ (L @ top_vecs)  # (G, k, r)
    sigma = top_vals.sqrt()
    tiny = sigma <= sigma[:, :1].clamp_min(1e-300) * 1e-12
    v = v / torch.where(tiny, 1.0, sigma)[:, None, :]
    a_prime = v.transpose(1, 2)  # (G, r, k)
    if bool(tiny.any()):
        # Rank-deficient updates (e.g. a zero adapter): complete A' to orthonormal rows so that
        # the heads solve a well-posed problem; the missing directions carry no energy anyway.
        a_prime = _orthonormal_rows(a_prime)
    return top_vals, a_prime


def _top_eigen_gram(
    a64: torch.Tensor, b64: torch.Tensor, routing: torch.Tensor, m: int, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of G_W = sum_c n_c Dbar_c^T Dbar_c, formed as a k x k matrix.

    A head with one task contributes A_i^T (B_i^T B_i) A_i (cheap, from r x r Grams); a head with
    several contributes T_c^T T_c / n_c with T_c = sum_{i in c} B_i A_i, its only dense d x k.
    """
    G, K, _, k = a64.shape
    gram = torch.zeros(G, k, k, dtype=a64.dtype, device=a64.device)
    for g in range(G):
        members = [torch.nonzero(routing[g] == c).flatten() for c in range(m)]
        singles = torch.cat([idx for idx in members if len(idx) == 1] or [routing.new_zeros(0)])
        if len(singles):
            a_s, b_s = a64[g, singles], b64[g, singles]  # (n, r, k), (n, d, r)
            c_a = (b_s.transpose(1, 2) @ b_s) @ a_s  # (n, r, k)
            gram[g] += torch.einsum("nrk,nrl->kl", a_s, c_a)
        for idx in members:
            if len(idx) > 1:
                t = torch.einsum("ndr,nrk->dk", b64[g, idx], a64[g, idx])  # (d, k)
                gram[g] += t.T @ t / len(idx)
    top_vals, top_vecs = top_eigenpairs(gram, r)
    a_prime = top_vecs.transpose(1, 2).contiguous()  # (G, r, k), orthonormal
    return top_vals.clamp_min(0.0), a_prime


# Many adapters (K >= FLOAT32_GRAM_FROM, float32 factors): the k x k Gram's big products (inner
# dimension K r) run in float32 on GRAM_BLOCK tasks at a time, their sums in float64 (2x faster
# than float64 products here, 85 vs 44 GFLOP per CPU second; see the function's doc).
FLOAT32_GRAM_FROM = 64
GRAM_BLOCK = 64


def _top_eigen_gram_float32_products(
    A: torch.Tensor, scaled_B: torch.Tensor, routing: torch.Tensor, m: int, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_top_eigen_gram` from float32 factors, its products over tasks in float32; also
    returns :func:`total_energy` (G,), in float64 a block of tasks at a time.

    At K = 1,000 at 1B shape each module's Gram is a (k x K r)(K r x k) product, 268 GFLOP, which
    in float64 was most of the closed form's time. Here every GRAM_BLOCK-task partial product
    (inner dimension GRAM_BLOCK r) is a float32 GEMM whose float32 inputs multiply exactly
    enough (adapters stored in 16 bits multiply exactly in float32) and whose sum rounds at
    ~1e-7 relative; the partials and everything after them (the Gram, its eigenpairs, the
    energies) are float64. A head with one task contributes R_i^T R_i, R_i = L_i^T A_i with
    L_i L_i^T = B_i^T B_i (float64 r x r), so the Gram stays symmetric PSD; a head with several
    T_c^T T_c / n_c with T_c = sum_i B_i A_i summed in float64 over the blocks.
    """
    G, K, _, k = A.shape
    f64 = torch.float64
    gram = torch.zeros(G, k, k, dtype=f64, device=A.device)
    total = torch.zeros(G, dtype=f64, device=A.device)
    for g in range(G):
        for lo in range(0, K, GRAM_BLOCK):  # float64 copies of one block at a time
            span = slice(lo, lo + GRAM_BLOCK)
            total[g] += total_energy(A[g, None, span].to(f64), scaled_B[g, None, span].to(f64))[0]
        members = [torch.nonzero(routing[g] == c).flatten() for c in range(m)]
        singles = torch.cat([idx for idx in members if len(idx) == 1] or [routing.new_zeros(0)])
        for lo in range(0, len(singles), GRAM_BLOCK):
            part = singles[lo : lo + GRAM_BLOCK]
            b_s = scaled_B[g, part].to(f64)  # (n, d, r)
            lower = _psd_sqrt_factor(b_s.transpose(1, 2) @ b_s)  # (n, r, r)
            root = (lower.transpose(1, 2) @ A[g, part].to(f64)).to(A.dtype)  # (n, r, k)
            flat = root.reshape(-1, k)  # (n r, k)
            gram[g] += (flat.T @ flat).to(f64)
        for idx in members:
            if len(idx) > 1:
                t = torch.zeros(scaled_B.shape[2], k, dtype=f64, device=A.device)  # (d, k)
                for lo in range(0, len(idx), GRAM_BLOCK):
                    part = idx[lo : lo + GRAM_BLOCK]
                    t += torch.einsum("ndr,nrk->dk", scaled_B[g, part], A[g, part]).to(f64)
                gram[g] += t.T @ t / len(idx)
    top_vals, top_vecs = top_eigenpairs(gram, r)
    a_prime = top_vecs.transpose(1, 2).contiguous()  # (G, r, k), orthonormal
    return top_vals.clamp_min(0.0), a_prime, total


def total_energy(A: torch.Tensor, scaled_B: torch.Tensor) -> torch.Tensor:
    """sum_i ||B_i A_i||_F^2 per group (G,), from r x r Grams."""
    bb = scaled_B.transpose(-1, -2) @ scaled_B  # (G, K, r, r)
    aa = A @ A.transpose(-1, -2)  # (G, K, r, r)
    return (bb * aa).sum(dim=(-1, -2, -3))


def _orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Replace degenerate rows so the (G, r, k) matrix has orthonormal rows (QR of a^T + noise)."""
    gen = torch.Generator(device=a.device).manual_seed(0)
    noise = torch.randn(a.shape, generator=gen, dtype=a.dtype, device=a.device) * 1e-6
    q, _ = torch.linalg.qr((a + noise).transpose(1, 2))
    # keep the sign/orientation of the good rows
    sign = torch.sign((q.transpose(1, 2) * a).sum(-1, keepdim=True))
    return q.transpose(1, 2) * torch.where(sign == 0, 1.0, sign)


def projected_heads(A: torch.Tensor, scaled_B: torch.Tensor, a_prime: torch.Tensor) -> torch.Tensor:
    """P_i = B_i A_i A'^T (G, K, d, r): each task's best own head for this A'."""
    return scaled_B @ (A @ a_prime.transpose(1, 2)[:, None])


def routed_heads(projected: torch.Tensor, routing: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Mean projected head per cluster (G, M, d, r) — the optimal heads for a fixed A' and routing."""
    G, K = routing.shape
    if num_heads == K and bool(
        (routing.sort(dim=1).values == torch.arange(K, device=routing.device)).all()
    ):
        # One task per head (M = K): each head is its task's projected head; the one-hot
        # product below would cost K x M x d x r (131 GFLOP per 1B module at K = 1,000) to
        # add zeros. Same values (x * 1 + zeros = x; only the sign of a zero may differ).
        order = torch.argsort(routing, dim=1)  # head c's task
        return projected[torch.arange(G, device=routing.device)[:, None], order]
    onehot = torch.nn.functional.one_hot(routing, num_heads).to(projected.dtype)  # (G, K, M)
    counts = onehot.sum(dim=1).clamp_min(1.0)  # (G, M)
    summed = torch.einsum("gkm,gkdr->gmdr", onehot, projected)
    return summed / counts[:, :, None, None]
