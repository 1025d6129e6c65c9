"""Measured errors of a hard-routed merge: f(ΔW_i, B'_{route(i)} A') per module and task.

The distances themselves are :mod:`~hydraopt.merge.distances`'; this module decides how to
evaluate them over many tasks: the fused MAE kernel where it applies, the separable formulas a
block of tasks at a time in one reused buffer (memory flat in K), or the plain formulas where a
gradient is needed.
"""

from __future__ import annotations

import torch

from hydraopt.merge.distances import SEPARABLE, get_distance
from hydraopt.merge.kernels import OrderKeys, fused_available, head_sign_sums
from hydraopt.merge.targets import Targets, take_targets

ERROR_BLOCK = 8  # tasks per block of the error evaluation


def hard_routed_error(
    delta: Targets | OrderKeys,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    distance: str,
) -> torch.Tensor:
    """f(ΔW_i, B'_{route(i)} A') per module and task (G, K).

    Without autograd, the separable distances (mae, mse, fro) are computed ERROR_BLOCK tasks at a
    time in one reused buffer: the same numbers with a memory peak that does not grow with K.

    Args:
        delta: (G, K, d, k) the original updates, dense, as
            :class:`~hydraopt.merge.targets.FactorTargets`, or (MAE only) as the fused kernels'
            :class:`~hydraopt.merge.kernels.OrderKeys`.
        a: (G, r, k); heads: (G, M, d, r); routing: (G, K).
    """
    if isinstance(delta, OrderKeys):
        if distance != "mae":
            raise ValueError("targets given as order keys serve the MAE only")
        return _fused_mae_error(delta, a.to(delta.dtype), heads.to(delta.dtype), routing)
    g_idx = torch.arange(heads.shape[0], device=heads.device)[:, None]
    needs_graph = torch.is_grad_enabled() and (a.requires_grad or heads.requires_grad)
    # Dense targets only: with targets kept as factors (many adapters) forming them dominates,
    # and the kernels' runtime memory would count against the flat-memory promise.
    if (
        isinstance(delta, torch.Tensor)
        and not needs_graph
        and distance == "mae"
        and fused_available(delta.device, delta.dtype, a.dtype, heads.dtype)
    ):
        return _fused_mae_error(delta, a, heads, routing)
    if needs_graph or distance not in SEPARABLE:
        approx = heads[g_idx, routing] @ a[:, None]  # (G, K, d, k)
        return get_distance(distance)(take_targets(delta, slice(None)), approx)
    K, (d, k) = routing.shape[1], delta.shape[-2:]
    # One head, targets formed per block (many adapters): subtract the one H A' from each
    # freshly formed ΔW in place instead of writing H A' out once per task, a pass over every
    # task's d x k saved (K = 500 at 1B shape: these evaluations were most of the merge).
    # |ΔW - X| = |X - ΔW| exactly, so the numbers do not change.
    single = (
        heads @ a[:, None] if heads.shape[1] == 1 and not isinstance(delta, torch.Tensor) else None
    )
    out = []
    for lo in range(0, K, ERROR_BLOCK):
        block = slice(lo, lo + ERROR_BLOCK)
        if single is not None:
            out.append(SEPARABLE[distance](take_targets(delta, block).sub_(single), d * k))
            continue
        err = heads[g_idx, routing[:, block]] @ a[:, None]  # (G, b, d, k)
        err.sub_(take_targets(delta, block))
        out.append(SEPARABLE[distance](err, d * k))
    return torch.cat(out, dim=1)


def distance_to_zero(delta: Targets, distance: str) -> torch.Tensor:
    """f(ΔW_i, 0) per module and task (G, K): the error of storing nothing.

    The yardstick of "relative error". The separable distances need no product with the (zero)
    heads, only the targets, ERROR_BLOCK tasks at a time.
    """
    G, K, d, k = delta.shape
    if distance not in SEPARABLE:
        targets = take_targets(delta, slice(None))
        return get_distance(distance)(targets, torch.zeros_like(targets))
    out = []
    for lo in range(0, K, ERROR_BLOCK):
        block = take_targets(delta, slice(lo, lo + ERROR_BLOCK))
        if isinstance(delta, torch.Tensor):
            block = block.clone()  # a view of the caller's tensor: the formulas work in place
        out.append(SEPARABLE[distance](block, d * k))
    return torch.cat(out, dim=1)


def _fused_mae_error(
    delta: torch.Tensor | OrderKeys, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor
) -> torch.Tensor:
    """:func:`hard_routed_error` for MAE with the fused kernel: M products instead of K, one pass."""
    _, l1 = head_sign_sums(heads @ a[:, None], delta, routing, with_signs=False)
    assert l1 is not None
    return l1.to(a.dtype)
