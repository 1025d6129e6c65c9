"""HydraOpt on VeRA vectors: the registered ``hydraopt`` method's VeRA entry point (pure tensors).

Steps, as for LoRA (docs/methods.md): the exact squared-Frobenius solution with hard routing
(:mod:`hydraopt.kinds.vera.solve`), then Adam on the *hard-routed* chosen distance over the dense
ΔW of the chunk's modules, keeping the best iterate per module (never worse than its start).

The refinement uses LoRA's pieces (:mod:`~hydraopt.merge.adam`'s optimiser, schedule and
best-iterate keeping, :mod:`~hydraopt.merge.measure`'s errors, the least-squares head
magnitudes of :mod:`~hydraopt.merge.head_scales`); VeRA supplies only its parametrisation (a
shared vector and M head vectors) and its MAE gradient chained to those vectors.
"""

from __future__ import annotations

import torch

from hydraopt.kinds.vera.config import Shared, VeraHydraOptConfig
from hydraopt.kinds.vera.solve import solve_vera
from hydraopt.merge.adam import Adam, BestIterate, cosine_lr, module_rms
from hydraopt.merge.base import check_heads
from hydraopt.merge.head_scales import head_scale_factors
from hydraopt.merge.measure import hard_routed_error
from hydraopt.types import MergedVeraStack, VeraStack


def assemble(shared: Shared, s: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor):
    """(shared (G, n_s), heads (G, M, n_h)) -> :class:`MergedVeraStack` with the right sides."""
    if shared == "lambda_d":
        return MergedVeraStack(lambda_b=heads, lambda_d=s[:, None, :], routing=routing)
    return MergedVeraStack(lambda_b=s[:, None, :], lambda_d=heads, routing=routing)


def merge_vera_hydraopt(
    stack: VeraStack, config: VeraHydraOptConfig, *, generator: torch.Generator
) -> MergedVeraStack:
    """One shared vector and M heads of the other per module, hard routing (see module doc).

    Args:
        stack: G same-shaped modules of K VeRA adapters.
        config: heads, distance, shared side, routing restarts, refinement.
        generator: the chunk's generator (k-means++ starts).

    Returns:
        A :class:`MergedVeraStack` (float32).
    """
    check_heads(config.heads, stack.lambda_b.shape[1])
    s, heads, routing, _ = solve_vera(
        stack.lambda_b,
        stack.lambda_d,
        stack.A,
        stack.B,
        config.heads,
        shared=config.shared,
        generator=generator,
        restarts=config.restarts,
    )
    s, heads = s.float(), heads.float()
    # The closed form is exact for squared Frobenius (mse up to a constant): nothing to refine.
    if config.refine_steps > 0 and config.distance != "mse":
        delta = stack.delta()
        s, heads = refine_vera(
            delta,
            stack,
            config.shared,
            s,
            heads,
            routing,
            distance=config.distance,
            steps=config.refine_steps,
            lr=config.refine_lr,
        )
        if config.distance == "cos":
            heads = fit_head_magnitudes(delta, stack, config.shared, s, heads, routing)
    return assemble(config.shared, s, heads, routing)


def routed_error(
    delta: torch.Tensor,
    stack: VeraStack,
    shared: Shared,
    s: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    distance: str,
) -> torch.Tensor:
    """f(ΔW_i, ΔW'_route(i)) per module and task (G, K), through the LoRA-form of the merge."""
    a, lora_heads = assemble(shared, s, heads, routing).as_lora(stack.A, stack.B)
    return hard_routed_error(delta, a, lora_heads, routing, distance)


def refine_vera(
    delta: torch.Tensor,
    stack: VeraStack,
    shared: Shared,
    s: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    *,
    distance: str,
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam (cosine schedule, no weight decay) on the hard-routed distance; the best (shared, heads) per module.

    Both vectors are optimised as unit-RMS copies (one scale per module and vector), so one
    relative learning rate suits modules and vectors of any magnitude.
    """
    with torch.no_grad():  # the start is the error to beat: never worse than it
        start_err = routed_error(delta, stack, shared, s, heads, routing, distance).mean(1)
    best = BestIterate([s, heads], start_err)
    sc_s = module_rms(s)[:, None]  # (G, 1)
    sc_h = module_rms(heads)[:, None, None]  # (G, 1, 1)
    p_s = (s / sc_s).requires_grad_(True)
    p_h = (heads / sc_h).requires_grad_(True)
    adam = Adam([p_s, p_h])  # the LoRA refinement's optimiser (no torch.optim start-up cost)

    def keep_better(err: torch.Tensor) -> None:
        best.offer(err, lambda: [p_s.detach() * sc_s, p_h.detach() * sc_h])

    work = torch.empty_like(delta) if distance == "mae" else None
    for step in range(steps):
        if work is not None:
            # MAE: the LoRA refinement's hand-written gradient, chained to the vectors (no
            # autograd graph over the dense (G, K, d, k) tensors: several times faster).
            with torch.no_grad():
                per_module, g_s, g_h = vera_mae_value_and_grads(
                    delta, stack, shared, p_s * sc_s, p_h * sc_h, routing, work
                )
                grads = [g_s * sc_s, g_h * sc_h]
        else:
            per_module = routed_error(
                delta, stack, shared, p_s * sc_s, p_h * sc_h, routing, distance
            ).mean(1)  # (G,)
            # Modules are independent: summing keeps each module's gradient its own.
            grads = list(torch.autograd.grad(per_module.sum(), [p_s, p_h]))
        with torch.no_grad():  # the loss is at the current point: record it before stepping
            keep_better(per_module.detach())
        adam.step(grads, cosine_lr(lr, step, steps))
    del work
    with torch.no_grad():
        keep_better(
            routed_error(delta, stack, shared, p_s * sc_s, p_h * sc_h, routing, distance).mean(1)
        )
    best_s, best_h = best.tensors
    return best_s, best_h


def vera_mae_value_and_grads(
    delta: torch.Tensor,
    stack: VeraStack,
    shared: Shared,
    s: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    work: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-over-tasks MAE per module and its gradients w.r.t. the shared vector and the heads.

    Every merged update is a row scaling of a product: ΔW'_c = diag(λb_c) P with P = B diag(λd) A
    (λd shared: one P per module) or ΔW'_c = diag(λb) P_c with P_c = B diag(λd_c) A (λb shared).
    With S_c = Σ_{i->c} sign(ΔW'_c - ΔW_i), the gradients are
        d/dλb[i] = Σ_j S[i, j] P[i, j]          (elementwise)
        d/dλd[q] = Σ_i B[i, q] ((λb ∘ S) Aᵀ)[i, q]
    so a step costs one or two rank-r products per head instead of three per task — at VeRA's
    r = 256 that is where an autograd step spends its time.

    Returns:
        loss (G,), grad of the shared vector (G, n_s), grad of the heads (G, M, n_h).
    """
    G, K, d, k = delta.shape
    M = heads.shape[1]
    A, B = stack.A.to(delta.dtype), stack.B.to(delta.dtype)
    if shared == "lambda_d":
        prod = (B * s[:, None, :]) @ A  # (G, d, k): the one P
        prod = prod[:, None]  # (G, 1, d, k), broadcast over heads
        rows = heads  # λb_c (G, M, d)
    else:
        prod = (B * heads[:, :, None, :]) @ A  # (G, M, d, k): P_c
        rows = s[:, None, :].expand(G, M, d)  # the shared λb
    approx = rows[..., None] * prod  # (G, M, d, k)
    g_idx = torch.arange(G, device=delta.device)[:, None]
    flat = (g_idx * M + routing).flatten()  # (G K,) slot of each task's head
    torch.index_select(approx.reshape(G * M, d, k), 0, flat, out=work.view(G * K, d, k))
    del approx
    work.sub_(delta)
    loss = work.abs().sum((2, 3)).div(d * k).mean(1)  # (G,)
    work.sign_()
    signs = work.new_zeros(G * M, d, k).index_add_(0, flat, work.view(G * K, d, k))
    signs = signs.view(G, M, d, k).mul_(1.0 / (K * d * k))  # dloss/dΔW'_c
    g_rows = (signs * prod).sum(-1)  # (G, M, d): dloss/d(row scale of head c)
    if shared == "lambda_d":
        weighted = (signs * heads[..., None]).sum(1)  # (G, d, k): Σ_c λb_c ∘ S_c
        g_lambda_d = ((weighted @ A.transpose(0, 1)) * B).sum(1)  # (G, r)
        return loss, g_lambda_d, g_rows
    g_heads = (((signs * s[:, None, :, None]) @ A.transpose(0, 1)) * B).sum(2)  # (G, M, r)
    return loss, g_rows.sum(1), g_heads


def fit_head_magnitudes(
    delta: torch.Tensor,
    stack: VeraStack,
    shared: Shared,
    s: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
) -> torch.Tensor:
    """Rescale each head by its least-squares magnitude (cosine ignores it; the deployed ΔW' not).

    ΔW' is linear in the head vector, so the factor of
    :func:`~hydraopt.merge.head_scales.head_scale_factors` scales the head itself and leaves
    every cosine unchanged.
    """
    a, lora_heads = assemble(shared, s, heads, routing).as_lora(stack.A, stack.B)
    alpha = head_scale_factors(delta, lora_heads @ a[:, None], routing)  # (G, M)
    return heads * alpha[:, :, None]
