"""Measured errors of a hard-routed merge: f(ΔW_i, B'_{route(i)} A') per module and task.

The distances themselves are :mod:`~hydraopt.merge.distances`'; this module decides how to
evaluate them over many tasks: the fused MAE kernel where it applies, the separable formulas a
block of tasks at a time in one reused buffer (memory flat in K), or the plain formulas where a
gradient is needed; and (:func:`hard_routed_errors`) several points and the zero yardstick from
one formation of each block's targets, which at K = 1,000 is what a merge's time goes into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch

from hydraopt.merge.distances import SEPARABLE, get_distance
from hydraopt.merge.kernels import OrderKeys, fused_available, head_sign_sums, tile_sums
from hydraopt.merge.targets import FactorTargets, Targets, take_targets

ERROR_BLOCK = 8  # tasks per block of the error evaluation
# Elements of one tile (tasks x rows x k) of the tiled evaluation (:func:`_tiled_errors`): the
# tile, its error and the block's A_i stay in the cache while every point is measured on them.
TILE_ELEMENTS = 1 << 20
TILE_TASKS = 4
# The fused tiles (numba): a point with at most this many heads has every H_c A' formed once
# (FEW_HEADS d x k matrices per point), each task's tile compared with its head's rows; more heads
# (M = K) take one GEMM per tile, E = T - H_i A', as the torch path.
FEW_HEADS = 16


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
    if _tiles(delta):
        return _tiled_errors(delta, [(a, heads)], routing, distance, with_zero=False)[0][0]
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
    if _tiles(delta):
        zero = _tiled_errors(delta, [], None, distance, with_zero=True)[1]
        assert zero is not None
        return zero
    out = []
    for lo in range(0, K, ERROR_BLOCK):
        block = take_targets(delta, slice(lo, lo + ERROR_BLOCK))
        if isinstance(delta, torch.Tensor):
            block = block.clone()  # a view of the caller's tensor: the formulas work in place
        out.append(SEPARABLE[distance](block, d * k))
    return torch.cat(out, dim=1)


def hard_routed_errors(
    delta: Targets,
    points: Sequence[tuple[torch.Tensor, torch.Tensor]],
    routing: torch.Tensor,
    distance: str,
    *,
    with_zero: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """:func:`hard_routed_error` of several points (A', heads) and, if asked,
    :func:`distance_to_zero`, the same numbers bit for bit, in one pass over the targets.

    With targets kept as factors (many adapters) each task's ΔW is formed once here instead of
    once per evaluation: at K = 1,000 at 1B shape forming them dominated the merge (RESULTS.md
    section 19). Other targets or distances are evaluated one by one.

    Args:
        delta: (G, K, d, k) the original updates, dense or as factors.
        points: (A' (G, r, k), heads (G, M, d, r)) pairs, all routed by ``routing`` (G, K).
        with_zero: also return f(ΔW_i, 0).

    Returns:
        The errors (G, K) of each point, in order, and the zero distance (G, K) or None.
    """
    needs_graph = torch.is_grad_enabled() and any(
        a.requires_grad or h.requires_grad for a, h in points
    )
    if isinstance(delta, torch.Tensor) or distance not in SEPARABLE or needs_graph:
        one_by_one = [hard_routed_error(delta, a, h, routing, distance) for a, h in points]
        return one_by_one, distance_to_zero(delta, distance) if with_zero else None
    if _tiles(delta):
        return _tiled_errors(delta, points, routing, distance, with_zero=with_zero)
    G, K, d, k = delta.shape
    g_idx = torch.arange(G, device=routing.device)[:, None]
    formula = SEPARABLE[distance]
    # One head: its single H A' (G, 1, d, k) is subtracted from every task's ΔW.
    singles = [h @ a[:, None] if h.shape[1] == 1 else None for a, h in points]
    errors: list[list[torch.Tensor]] = [[] for _ in points]
    zero: list[torch.Tensor] = []
    # Two buffers reused by every block: a fresh (G, ERROR_BLOCK, d, k) tensor per product is a
    # fresh mmap whose pages fault in one by one (at 1B shape 128 MiB each, as slow as the GEMM).
    size = G * min(ERROR_BLOCK, K) * d * k
    target_buf = torch.empty(size, dtype=delta.dtype, device=routing.device)
    error_buf = torch.empty(size, dtype=delta.dtype, device=routing.device)
    for lo in range(0, K, ERROR_BLOCK):
        block = slice(lo, lo + ERROR_BLOCK)
        n = min(K, lo + ERROR_BLOCK) - lo
        # (G, n, d, k), formed once for every point: FactorTargets.take into the buffer.
        targets = target_buf[: G * n * d * k].view(G, n, d, k)
        torch.matmul(delta.scaled_B[:, block], delta.A[:, block], out=targets)
        err = error_buf[: G * n * d * k].view(G, n, d, k)
        for out, (a, h), single in zip(errors, points, singles, strict=True):
            # The same operations, in the same order, as hard_routed_error's blocked loop.
            if single is not None:
                torch.sub(targets, single, out=err)
            else:
                torch.matmul(h[g_idx, routing[:, block]], a[:, None], out=err)  # (G, n, d, k)
                err.sub_(targets)
            out.append(formula(err, d * k))
        if with_zero:
            zero.append(formula(targets, d * k))  # last: the formula overwrites its input
    joined = [torch.cat(out, dim=1) for out in errors]
    return joined, torch.cat(zero, dim=1) if with_zero else None


def _fused_mae_error(
    delta: torch.Tensor | OrderKeys, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor
) -> torch.Tensor:
    """:func:`hard_routed_error` for MAE with the fused kernel: M products instead of K, one pass."""
    _, l1 = head_sign_sums(heads @ a[:, None], delta, routing, with_signs=False)
    assert l1 is not None
    return l1.to(a.dtype)


def _tiles(delta: Targets) -> TypeGuard[FactorTargets]:
    """Whether :func:`_tiled_errors` measures these targets: kept as factors, more than one block
    of tasks (many adapters; a handful keep the blocked loop's numbers bit for bit)."""
    return isinstance(delta, FactorTargets) and delta.shape[1] > ERROR_BLOCK


def _tiled_errors(
    delta: FactorTargets,
    points: Sequence[tuple[torch.Tensor, torch.Tensor]],
    routing: torch.Tensor | None,
    distance: str,
    *,
    with_zero: bool,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """:func:`hard_routed_errors` over factor targets, a cache-sized tile of ΔW at a time.

    Each tile (n tasks x a few rows x k) of the targets is formed once into a small reused buffer
    and every point's error (and the zero yardstick) is reduced from it while it is still in the
    cache: E = T - H A' is one GEMM onto T (addmm, beta 1, alpha -1) or, for one head, a
    subtraction of its precomputed rows, and sum |E| (or sum E^2) reads E once. Blocks of
    ERROR_BLOCK tasks the size of 1B-shape matrices (128 MiB) went to memory and back four or
    five times per point; at K = 1,000 that was most of a merge (RESULTS.md section 21). The sums
    over a task's row tiles add up in float64, so only the tile's own float32 sum rounds.
    """
    G, K, d, k = delta.shape
    device = delta.A.device
    square = distance != "mae"  # mse and fro reduce E^2, mae |E|
    n_max = min(TILE_TASKS, K)
    rows = max(1, min(d, TILE_ELEMENTS // (n_max * k)))
    sums = [torch.zeros(G, K, dtype=torch.float64, device=device) for _ in points]
    zero = torch.zeros(G, K, dtype=torch.float64, device=device) if with_zero else None
    tile_buf = torch.empty(n_max * rows * k, dtype=delta.dtype, device=device)
    err_buf = torch.empty_like(tile_buf)
    dtypes = [t.dtype for point in points for t in point]
    run = _TileRun(delta, points, routing, square, rows, sums, zero, (tile_buf, err_buf))
    if delta.dtype == torch.float32 and fused_available(device, delta.dtype, *dtypes):
        _fused_tiles(run)
    else:
        _torch_tiles(run)
    finish = torch.sqrt if distance == "fro" else (lambda s: s / (d * k))
    return [finish(s).to(delta.dtype) for s in sums], (
        None if zero is None else finish(zero).to(delta.dtype)
    )


@dataclass(frozen=True)
class _TileRun:
    """One :func:`_tiled_errors` call's inputs and outputs: the tiles' loops add each point's
    and the zero yardstick's sums into ``sums`` and ``zero`` ((G, K) float64) in place."""

    delta: FactorTargets
    points: Sequence[tuple[torch.Tensor, torch.Tensor]]
    routing: torch.Tensor | None
    square: bool  # mse and fro reduce E^2, mae |E|
    rows: int  # rows of ΔW per tile
    sums: list[torch.Tensor]
    zero: torch.Tensor | None
    buffers: tuple[torch.Tensor, torch.Tensor]  # the tile's and its error's


def _torch_tiles(run: _TileRun) -> None:
    """:func:`_tiled_errors`' tiles reduced by torch: each point's and the zero yardstick's sums
    added into ``sums`` and ``zero`` (G, K) float64."""
    delta, points, routing, square, rows = run.delta, run.points, run.routing, run.square, run.rows
    sums, zero, (tile_buf, err_buf) = run.sums, run.zero, run.buffers
    G, K, d, k = delta.shape
    n_max = min(TILE_TASKS, K)
    # One head: H A' (G, d, k) once per point, its rows subtracted from every task's tile.
    singles = [h[:, 0] @ a if h.shape[1] == 1 else None for a, h in points]
    assert routing is not None or not points
    for g in range(G):
        for lo in range(0, K, n_max):
            n = min(K, lo + n_max) - lo
            b_g, a_g = delta.scaled_B[g, lo : lo + n], delta.A[g, lo : lo + n]  # (n, d|r, r|k)
            routed = [
                h[g, routing[g, lo : lo + n]] if s is None and routing is not None else None
                for (_, h), s in zip(points, singles, strict=True)
            ]  # (n, d, r) per point with several heads
            for r0 in range(0, d, rows):
                rr = slice(r0, min(d, r0 + rows))
                size = n * (rr.stop - r0) * k
                tile = tile_buf[:size].view(n, -1, k)
                torch.bmm(b_g[:, rr], a_g, out=tile)  # (n, rows, k): ΔW_i's rows
                err = err_buf[:size].view(n, -1, k)
                for acc, (a, _), single, heads in zip(sums, points, singles, routed, strict=True):
                    if single is not None:
                        torch.sub(tile, single[g, rr], out=err)
                    else:
                        assert heads is not None
                        flat_heads = heads[:, rr].reshape(-1, heads.shape[-1])  # (n rows, r)
                        torch.addmm(
                            tile.view(-1, k), flat_heads, a[g], alpha=-1, out=err.view(-1, k)
                        )
                    acc[g, lo : lo + n] += _tile_sum(err, square)
                if zero is not None:  # last: the sum overwrites the tile
                    zero[g, lo : lo + n] += _tile_sum(tile, square)


def _fused_tiles(run: _TileRun) -> None:
    """:func:`_torch_tiles` with the tiles reduced by a fused kernel (numba, CPU, float32).

    Each tile is formed by the same GEMM; then one kernel call reads each of its rows once from
    L1 for every point with few heads (E = T - (H A')_route(i), the products H_c A' formed once
    per point) and for the zero yardstick, and writes nothing back: the torch path's subtraction,
    abs_ and sum were three passes over the 4 MiB tile per point, 2-4x the kernel's time (at
    K = 1,000 these closing measurements were a third of a merge). Points with many heads (M = K)
    still form E = T - H_i A' by one GEMM per tile; the kernel reduces it in one read.
    """
    delta, points, routing, square, rows = run.delta, run.points, run.routing, run.square, run.rows
    sums, zero, (tile_buf, err_buf) = run.sums, run.zero, run.buffers
    G, K, d, k = delta.shape
    n_max = min(TILE_TASKS, K)
    device = delta.A.device
    few = [i for i, (_, h) in enumerate(points) if h.shape[1] <= FEW_HEADS]
    # Every head's H_c A' of the few-head points, rows side by side (G, d, Q, k), and per task
    # and point the column of its head (G, K, P).
    products = [points[i][1] @ points[i][0][:, None] for i in few]  # (G, M_i, d, k) each
    formed = torch.cat(products, dim=1) if products else delta.A.new_empty(G, 0, d, k)
    xs = formed.permute(0, 2, 1, 3).contiguous()
    del products, formed
    offsets = [0]
    for i in few:
        offsets.append(offsets[-1] + points[i][1].shape[1])
    if few:
        assert routing is not None
        # One head serves every task whatever the routing says (as the torch path's subtraction).
        sel = torch.stack(
            [
                routing + off if points[i][1].shape[1] > 1 else torch.full_like(routing, off)
                for i, off in zip(few, offsets, strict=False)
            ],
            dim=2,
        )
    else:
        sel = torch.zeros(G, K, 0, dtype=torch.long, device=device)
    none = xs.new_empty(rows, 0, k)
    no_sel = sel.new_empty(n_max, 0)
    many = [i for i in range(len(points)) if i not in few]
    assert routing is not None or not many
    for g in range(G):
        for lo in range(0, K, n_max):
            n = min(K, lo + n_max) - lo
            b_g, a_g = delta.scaled_B[g, lo : lo + n], delta.A[g, lo : lo + n]  # (n, d|r, r|k)
            routed = {i: points[i][1][g, routing[g, lo : lo + n]] for i in many}  # type: ignore[index]
            for r0 in range(0, d, rows):
                rr = slice(r0, min(d, r0 + rows))
                size = n * (rr.stop - r0) * k
                tile = tile_buf[:size].view(n, -1, k)
                torch.bmm(b_g[:, rr], a_g, out=tile)  # (n, rows, k): ΔW_i's rows
                together = tile_sums(tile, xs[g, rr], sel[g, lo : lo + n], square)  # (n, P + 1)
                for col, i in enumerate(few):
                    sums[i][g, lo : lo + n] += together[:, col]
                if zero is not None:
                    zero[g, lo : lo + n] += together[:, -1]
                err = err_buf[:size].view(n, -1, k)
                for i in many:
                    heads = routed[i][:, rr].reshape(-1, routed[i].shape[-1])  # (n rows, r)
                    torch.addmm(
                        tile.view(-1, k), heads, points[i][0][g], alpha=-1, out=err.view(-1, k)
                    )
                    sums[i][g, lo : lo + n] += tile_sums(
                        err, none[: rr.stop - r0], no_sel[:n], square
                    )[:, 0]


def _tile_sum(err: torch.Tensor, square: bool) -> torch.Tensor:
    """sum |E| (or sum E^2) per task of a (n, rows, k) tile; overwrites ``err``. In the cache
    abs_ and sum cost 0.2-0.3 ms per million elements, vector_norm's one read 0.9 (measured)."""
    return (err.square_() if square else err.abs_()).sum(dim=(1, 2)).double()
