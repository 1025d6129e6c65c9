"""HydraOpt on VeRA vectors: the registered ``hydraopt`` method's VeRA entry point (pure tensors).

Steps, as for LoRA (docs/methods.md): the exact squared-Frobenius solution with hard routing
(:mod:`hydraopt.kinds.vera.solve`), then Adam on the *hard-routed* chosen distance over the dense
ΔW of the chunk's modules, keeping the best iterate per module (never worse than its start).

The refinement is LoRA's loop (:func:`~hydraopt.merge.refine.refine_parameters`: unit-RMS
copies, Adam, cosine schedule, best iterate per module) with the least-squares head magnitudes
of :mod:`~hydraopt.merge.head_scales` after a cosine refinement; VeRA supplies only its
parameterisation (:class:`VectorRefinement`: a shared vector and M head vectors, their error
through the LoRA form, and the MAE gradient chained to those vectors).
"""

from __future__ import annotations

import torch

from hydraopt.kinds.vera.config import Shared, VeraHydraOptConfig
from hydraopt.kinds.vera.solve import solve_vera
from hydraopt.merge.adam import module_rms
from hydraopt.merge.base import check_heads
from hydraopt.merge.head_scales import head_scale_factors
from hydraopt.merge.measure import hard_routed_error
from hydraopt.merge.refine import BestFrom, refine_parameters
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
        problem = VectorRefinement(delta, stack, config.shared, routing, config.distance)
        (s, heads), _ = refine_parameters(
            problem, [s, heads], steps=config.refine_steps, lr=config.refine_lr
        )
        if config.distance == "cos":
            # The cosine ignores each head's magnitude, the deployed ΔW' does not: ΔW'_c is
            # linear in head c, so its least-squares factor scales the head vector (and leaves
            # every cosine unchanged).
            alpha = head_scale_factors(delta, problem.head_updates([s, heads]), routing)
            heads = heads * alpha[:, :, None]  # (G, M, n_h)
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


class VectorRefinement:
    """VeRA's parameterisation for :func:`~hydraopt.merge.refine.refine_parameters`: the point
    is (shared vector (G, n_s), head vectors (G, M, n_h)), each optimised as a unit-RMS copy
    with its own scale per module.

    Every step sees every task in float32, so the loop's losses are compared with the start's
    error from the first step on (``best_from = "start"``), at every step. MAE steps use
    :func:`vera_mae_value_and_grads`; the other distances autograd through the LoRA form.
    """

    best_from: BestFrom = "start"
    check_every: int | None = 1

    def __init__(
        self,
        delta: torch.Tensor,
        stack: VeraStack,
        shared: Shared,
        routing: torch.Tensor,
        distance: str,
    ):
        self.delta, self.stack, self.shared = delta, stack, shared
        self.routing, self.distance = routing, distance
        self.hand_written = distance == "mae"
        self.work: torch.Tensor | None = None

    def scales(self, point: list[torch.Tensor]) -> list[torch.Tensor]:
        s, heads = point
        return [module_rms(s)[:, None], module_rms(heads)[:, None, None]]  # (G, 1), (G, 1, 1)

    def error(self, point: list[torch.Tensor]) -> torch.Tensor:
        s, heads = point
        return routed_error(
            self.delta, self.stack, self.shared, s, heads, self.routing, self.distance
        )

    def head_updates(self, point: list[torch.Tensor]) -> torch.Tensor:
        """Each head's ΔW'_c (G, M, d, k)."""
        s, heads = point
        a, lora_heads = assemble(self.shared, s, heads, self.routing).as_lora(
            self.stack.A, self.stack.B
        )
        return lora_heads @ a[:, None]

    def begin(self) -> None:
        # The MAE gradient's one reused (G, K, d, k) buffer.
        self.work = torch.empty_like(self.delta) if self.hand_written else None

    def loss(self, point: list[torch.Tensor]) -> torch.Tensor:
        return self.error(point).mean(1)  # (G,)

    def loss_and_grads(
        self, point: list[torch.Tensor], with_loss: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        # LoRA's hand-written MAE gradient chained to the vectors (no autograd graph over the
        # dense (G, K, d, k) tensors: several times faster); its loss comes with it.
        assert self.work is not None
        s, heads = point
        loss, g_s, g_h = vera_mae_value_and_grads(
            self.delta, self.stack, self.shared, s, heads, self.routing, self.work
        )
        return loss, [g_s, g_h]

    def finish(self, point: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        self.work = None
        return self.error(point), True


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
