"""Gradient refinement of (A', heads) on any distance, with the routing held fixed.

The closed form is exact for the squared Frobenius distance; for MAE (the paper's default), the
unsquared Frobenius norm or the cosine distance, a short AdamW run from it lowers the *hard-routed*
error, which is what gets deployed. The best iterate per module is kept, so refinement can only
improve on its starting point.
"""

from __future__ import annotations

import torch

from hydraopt.merge.distances import get_distance


def hard_routed_error(
    delta: torch.Tensor, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor, distance: str
) -> torch.Tensor:
    """f(ΔW_i, B'_{route(i)} A') per module and task (G, K).

    Args:
        delta: (G, K, d, k) the original updates.
        a: (G, r, k); heads: (G, M, d, r); routing: (G, K).
    """
    g_idx = torch.arange(heads.shape[0], device=heads.device)[:, None]
    approx = heads[g_idx, routing] @ a[:, None]  # (G, K, d, k)
    return get_distance(distance)(delta, approx)


def mae_value_and_grads(
    delta: torch.Tensor,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    work: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-over-tasks MAE per module and its gradients w.r.t. A' and the heads.

    loss_g = 1/K sum_i mean|E_gi|, E_gi = H_{g,route(gi)} A'_g - ΔW_gi, so
    dloss/dH_c = sum_{i -> c} sign(E_i) A'^T / (K d k) and dloss/dA' = sum_i H^T sign(E_i) / (K d k).

    Args:
        work: a (G, K, d, k) buffer, overwritten.

    Returns:
        loss (G,), grad A' (G, r, k), grad heads (G, M, d, r).
    """
    G, K, d, k = delta.shape
    M = heads.shape[1]
    g_idx = torch.arange(G, device=heads.device)[:, None]
    routed = heads[g_idx, routing]  # (G, K, d, r)
    torch.matmul(routed, a[:, None], out=work)
    work.sub_(delta)  # E
    loss = work.abs().mean(dim=(2, 3)).mean(1)  # (G,)
    work.sign_()
    norm = 1.0 / (K * d * k)
    g_routed = work @ a[:, None].transpose(-1, -2)  # (G, K, d, r)
    onehot = torch.nn.functional.one_hot(routing, M).to(delta.dtype)  # (G, K, M)
    g_heads = torch.einsum("gkm,gkdr->gmdr", onehot, g_routed) * norm
    g_a = (routed.transpose(-1, -2) @ work).sum(1) * norm  # (G, r, k)
    return loss, g_a, g_heads


def balance(a: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale A' up and heads down (same product) so both have the same RMS per module.

    Adam's steps are about lr in every coordinate, so factors of very different magnitude would
    move at very different relative speeds; balancing lets one learning rate suit both.
    """
    rms_a = a.square().mean(dim=(1, 2)).sqrt().clamp_min(1e-30)  # (G,)
    rms_h = heads.square().mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-30)
    c = (rms_h / rms_a).sqrt()
    return a * c[:, None, None], heads / c[:, None, None, None]


def refine(
    delta: torch.Tensor,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    *,
    distance: str,
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW on the hard-routed distance; returns the best (A', heads) per module and its error.

    Args:
        delta: (G, K, d, k) targets.
        a, heads, routing: the starting point (see :func:`hard_routed_error`).
        distance: registry name of f.
        steps: optimisation steps (0 returns the start, evaluated).
        lr: learning rate *relative* to the balanced factors' RMS.

    Returns:
        A' (G, r, k), heads (G, M, d, r), mean error over tasks (G,).
    """
    a, heads = balance(a, heads)
    with torch.no_grad():
        best_err = hard_routed_error(delta, a, heads, routing, distance).mean(1)
    best_a, best_h = a.clone(), heads.clone()
    if steps <= 0:
        return best_a, best_h, best_err
    # Optimise unit-RMS copies, one scale per module, so one learning rate suits every module.
    scale = a.square().mean(dim=(1, 2)).sqrt().clamp_min(1e-30)  # (G,)
    s_a, s_h = scale[:, None, None], scale[:, None, None, None]
    a_p = (a / s_a).requires_grad_(True)
    h_p = (heads / s_h).requires_grad_(True)
    opt = torch.optim.AdamW([a_p, h_p], lr=lr, weight_decay=0.0)
    # Cosine decay: large early steps leave the Frobenius optimum fast, small late steps settle
    # into the L1 optimum instead of rattling around it.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def keep_better(err: torch.Tensor) -> None:
        nonlocal best_err
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            best_a[better] = (a_p.detach() * s_a)[better]
            best_h[better] = (h_p.detach() * s_h)[better]

    def current_error() -> torch.Tensor:
        return hard_routed_error(delta, a_p * s_a, h_p * s_h, routing, distance).mean(1)  # (G,)

    mae_work = torch.empty_like(delta) if distance == "mae" else None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if mae_work is not None:
            # Hand-written MAE gradient: 2x faster than autograd here (one reused buffer,
            # no graph), and this loop is where a default merge spends its time.
            with torch.no_grad():
                per_module, g_a, g_h = mae_value_and_grads(
                    delta, a_p * s_a, h_p * s_h, routing, mae_work
                )
                keep_better(per_module)
                a_p.grad, h_p.grad = g_a * s_a, g_h * s_h
        else:
            per_module = current_error()
            # The loss is evaluated at the current point: record it before stepping away.
            with torch.no_grad():
                keep_better(per_module.detach())
            # Modules are independent; summing keeps each module's gradient its own.
            per_module.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        keep_better(current_error())
    return best_a, best_h, best_err


def fit_head_scales(
    delta: torch.Tensor, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor
) -> torch.Tensor:
    """Rescale each head by the least-squares factor for the tasks routed to it.

    The cosine distance ignores magnitude, so a solution refined on it is only right up to a
    positive factor per head — and the deployed update is ΔW' itself, magnitude included. This
    picks alpha_c = sum_i <ΔW_i, H_c A'> / (n_c ||H_c A'||^2), the Frobenius-best magnitude, which
    leaves every cosine unchanged.

    Returns:
        heads (G, M, d, r) rescaled.
    """
    G, M = heads.shape[:2]
    approx_heads = heads @ a[:, None]  # (G, M, d, k)
    onehot = torch.nn.functional.one_hot(routing, M).to(delta.dtype)  # (G, K, M)
    inner = torch.einsum("gkdx,gmdx->gkm", delta, approx_heads)  # <ΔW_i, H_c A'>
    num = (inner * onehot).sum(1)  # (G, M)
    den = onehot.sum(1) * approx_heads.square().sum(dim=(2, 3))  # (G, M)
    alpha = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))
    return heads * alpha[:, :, None, None]
