"""Closed-form HydraOpt for VeRA vectors under the squared Frobenius distance (pure tensors).

Per module, with P = B (d, r), A (r, k), Gram G = A Aᵀ (r, r), task i's update row j is
b_ij (P_j ∘ e_i) A (b = λb, e = λd). So every inner product of two VeRA updates needs only the
(r, r) forms Q_j = G ∘ (P_j P_jᵀ):  <row_j(b, e), row_j(b', e')> = b_j b'_j eᵀ Q_j e'. We never
build Q_j either: eᵀ Q_j e' = ((P ∘ e) G (P ∘ e')ᵀ)_jj is O(d r²) for all rows at once, and
no (d, k) matrix is formed.

The error is bilinear in (shared vector, heads), so each of the two steps below is an exact least
squares and the alternation never increases it:

- *shared fixed*: the best head of a group of tasks is a mean of per-task features y_i, and the
  error of a routing is a k-means objective on the y_i (Lloyd steps from k-means++ starts,
  reusing :mod:`hydraopt.merge.routing` on their Gram matrix);
- *heads and routing fixed*: the shared vector solves a normal equation (λd: an r x r system;
  λb: one division per row).

All functions are batched over a leading module axis G and run in float64, so that M = K on
adapters that already share the fixed vector reproduces them to ~1e-12.
"""

from __future__ import annotations

import torch

from hydraopt.kinds.vera.config import Shared
from hydraopt.merge.routing import kmeans_pp, lloyd

_EPS = 1e-30


def row_forms(
    P: torch.Tensor, gram: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """xᵀ Q_j y for every row j: (..., r) x (..., r) -> (..., d), Q_j = G ∘ (P_j P_jᵀ)."""
    left = P * x[..., None, :]  # (..., d, r)
    right = (P * y[..., None, :]) @ gram  # (..., d, r)
    return (left * right).sum(-1)


def task_energy(
    P: torch.Tensor, gram: torch.Tensor, b: torch.Tensor, e: torch.Tensor
) -> torch.Tensor:
    """||ΔW_i||² per module and task: (G, K)."""
    return (b.square() * row_forms(P, gram, e, e)).sum(-1)


def _features(
    shared: Shared,
    s: torch.Tensor,
    b: torch.Tensor,
    e: torch.Tensor,
    P: torch.Tensor,
    gram: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task features y (G, K, n) whose cluster means give the best heads, and the decoder.

    Returns y and ``scale`` with head = ȳ * scale (λd shared) or head = ȳ @ scale (λb shared).
    The error of any routing is Σ_i ||ΔW_i||² - Σ_i ||y_i||² + Σ_i ||y_i - ȳ_route(i)||².
    """
    if shared == "lambda_d":
        # Row j of ΔW'_c is b'_cj (P_j ∘ e') A: a 1-D fit per row, y_ij = b_ij q_j(e_i, e') / √q_j(e', e').
        qss = row_forms(P, gram, s, s)  # (G, d)
        root = qss.clamp_min(0).sqrt()
        inv_root = torch.where(root > 0, 1.0 / root.clamp_min(_EPS), torch.zeros_like(root))
        qis = row_forms(P, gram, e, s[:, None, :])  # (G, K, d)
        return b * qis * inv_root[:, None, :], inv_root
    # λb shared: ΔW'_c = diag(b') P diag(e'_c) A is linear in e'_c with normal matrix
    # H = G ∘ (Pᵀ diag(b'²) P) and right-hand side g_i = Σ_j b_ij b'_j Q_j e_i; whitening by
    # H^(-1/2) turns the error into k-means on y_i = H^(-1/2) g_i.
    weighted = P * s.square()[:, :, None]  # (G, d, r)
    H = gram * (P.transpose(-1, -2) @ weighted)  # (G, r, r)
    g = _rhs(P, gram, b * s[:, None, :], e)  # (G, K, r)
    evals, evecs = torch.linalg.eigh(H)
    keep = evals > evals.amax(-1, keepdim=True).clamp_min(_EPS) * 1e-12
    inv_sqrt = torch.where(keep, evals.clamp_min(_EPS).rsqrt(), torch.zeros_like(evals))
    whiten = evecs * inv_sqrt[:, None, :]  # (G, r, r): H^(-1/2) = U Λ^(-1/2) (in U's basis)
    y = g @ whiten  # (G, K, r)
    return y, whiten.transpose(-1, -2)  # head = y_bar @ (U Λ^(-1/2))ᵀ = H⁺ ḡ


def _rhs(P: torch.Tensor, gram: torch.Tensor, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Σ_j u_ij Q_j e_i for every task: u (G, K, d), e (G, K, r) -> (G, K, r)."""
    V = (P * e[..., None, :]) @ gram  # (G, K, d, r): row j = (P_j ∘ e_i) G
    return (u[..., None] * P * V).sum(-2)


def _cluster_means(y: torch.Tensor, routing: torch.Tensor, m: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(routing, m).to(y.dtype)  # (G, K, M)
    counts = onehot.sum(1).clamp_min(1.0)  # (G, M)
    return onehot.transpose(1, 2) @ y / counts[:, :, None]  # (G, M, n)


def _decode(shared: Shared, y_bar: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if shared == "lambda_d":
        return y_bar * scale[:, None, :]  # (G, M, d)
    return y_bar @ scale  # (G, M, r)


def fit_shared(
    shared: Shared,
    heads: torch.Tensor,
    routing: torch.Tensor,
    b: torch.Tensor,
    e: torch.Tensor,
    P: torch.Tensor,
    gram: torch.Tensor,
) -> torch.Tensor:
    """The exact least-squares shared vector for fixed heads and routing: (G, n_shared)."""
    g_idx = torch.arange(heads.shape[0], device=heads.device)[:, None]
    routed = heads[g_idx, routing]  # (G, K, n_head)
    if shared == "lambda_d":
        # min_e' Σ_i Σ_j b'_j² e'ᵀ Q_j e' - 2 b_ij b'_j e_iᵀ Q_j e'  ->  H e' = g.
        w = routed.square().sum(1)  # (G, d)
        H = gram * (P.transpose(-1, -2) @ (P * w[:, :, None]))  # (G, r, r)
        g = _rhs(P, gram, b * routed, e).sum(1)  # (G, r)
        return (torch.linalg.pinv(H, hermitian=True) @ g[:, :, None])[..., 0]
    # λb shared: each row j is a 1-D least squares over tasks.
    num = (b * row_forms(P, gram, e, routed)).sum(1)  # (G, d)
    den = row_forms(P, gram, routed, routed).sum(1)  # (G, d)
    return torch.where(den > 0, num / den.clamp_min(_EPS), torch.zeros_like(num))


def _routing_error(
    y: torch.Tensor, base: torch.Tensor, routing: torch.Tensor, m: int
) -> torch.Tensor:
    """Squared-Frobenius error per module (G,) of the best heads for ``routing``."""
    g_idx = torch.arange(y.shape[0], device=y.device)[:, None]
    means = _cluster_means(y, routing, m)
    return base + (y - means[g_idx, routing]).square().sum((1, 2))


def solve_vera(
    b: torch.Tensor,
    e: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    num_heads: int,
    *,
    shared: Shared,
    generator: torch.Generator,
    restarts: int = 8,
    max_alternations: int = 50,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared vector, M heads and a hard routing minimising Σ_i ||ΔW_i - ΔW'_route(i)||²_F.

    Args:
        b: (G, K, d) the tasks' λb.  e: (G, K, r) the tasks' λd.
        A: (r, k), B: (d, r) the module group's projection slices.
        num_heads: M (1 <= M <= K).
        shared: which vector all tasks share; the other gets M heads.
        generator: source of the k-means++ starts (M strictly between 1 and K).
        restarts: k-means++ starts; the best is kept per module.
        max_alternations: cap on (shared, routing) alternations per start.

    Returns:
        shared (G, n_s), heads (G, M, n_h), routing (G, K), squared error (G,), all float64
        except routing (int64).
    """
    b, e = b.double(), e.double()
    P, gram = B.double(), (A.double() @ A.double().T)  # (d, r), (r, r)
    G, K = b.shape[:2]
    m = num_heads
    tasks_shared = e if shared == "lambda_d" else b
    # The mean is exact when the tasks already share this vector, and a good start otherwise.
    s0 = tasks_shared.mean(1)  # (G, n_s)
    energy = task_energy(P, gram, b, e).sum(1)  # (G,)
    identity = torch.arange(K, device=b.device).expand(G, K).clone()
    starts = 1 if m in (1, K) else max(1, restarts)
    best_err = torch.full((G,), torch.inf, dtype=torch.float64, device=b.device)
    n_head = b.shape[2] if shared == "lambda_d" else e.shape[2]
    best_s, best_route = s0.clone(), identity.clone()
    best_heads = torch.zeros(G, m, n_head, dtype=torch.float64, device=b.device)
    for _ in range(starts):
        s = s0
        y, scale = _features(shared, s, b, e, P, gram)
        if m == K:
            routing = identity
        elif m == 1:
            routing = torch.zeros_like(identity)
        else:
            gram_y = y @ y.transpose(1, 2)  # (G, K, K)
            routing = lloyd(gram_y, kmeans_pp(gram_y, m, generator), m)
        err = _routing_error(y, energy - y.square().sum((1, 2)), routing, m)
        for _ in range(max_alternations):
            heads = _decode(shared, _cluster_means(y, routing, m), scale)
            s_new = fit_shared(shared, heads, routing, b, e, P, gram)
            y_new, scale_new = _features(shared, s_new, b, e, P, gram)
            routing_new = routing
            if 1 < m < K:
                routing_new = lloyd(y_new @ y_new.transpose(1, 2), routing, m)
            err_new = _routing_error(y_new, energy - y_new.square().sum((1, 2)), routing_new, m)
            # Accept per module only where it helped (rounding can make a converged step tick up).
            better = err_new < err
            s = torch.where(better[:, None], s_new, s)
            routing = torch.where(better[:, None], routing_new, routing)
            y = torch.where(better[:, None, None], y_new, y)
            scale = torch.where(better.view(-1, *[1] * (scale.dim() - 1)), scale_new, scale)
            gain = (err - torch.minimum(err_new, err)).max()
            err = torch.minimum(err_new, err)
            if float(gain) <= 1e-13 * float(energy.max().clamp_min(_EPS)):
                break
        heads = _decode(shared, _cluster_means(y, routing, m), scale)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s[better] = s[better]
        best_heads[better] = heads[better]
        best_route[better] = routing[better]
    return best_s, best_heads, best_route, best_err.clamp_min(0.0)
