"""Gradient refinement of (A', heads) on any distance, with the routing held fixed.

The closed form is exact for the squared Frobenius distance; for MAE (the paper's default), the
unsquared Frobenius norm or the cosine distance, a short AdamW run from it lowers the *hard-routed*
error, which is what gets deployed. The best iterate per module is kept, so refinement can only
improve on its starting point.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from hydraopt.merge.distances import get_distance
from hydraopt.merge.kernels import OrderKeys, fused_available, head_sign_sums, order_keys

CHECK_EVERY = 10  # low-precision refinement: steps between looks at the loss

Precision = Literal["float32", "bfloat16"]
PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast on ``device`` (else they can be 10x *slower* than fp32).

    CUDA: the device says. CPU: only with AVX-512 BF16 or AMX (read from /proc/cpuinfo, so on
    other systems we stay in float32, the safe choice).
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` -> ``bfloat16`` where it is fast (see :func:`fast_bfloat16`), else ``float32``."""
    if precision == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class FactorTargets:
    """The updates ΔW_i = (s B)_i A_i kept as factors, formed a few tasks at a time.

    Stands in for the dense (G, K, d, k) targets when K is large, so that memory stays
    O(tasks per block x d x k) however many adapters there are.

    Attributes:
        A: (G, K, r, k); scaled_B: (G, K, d, r), LoRA scale folded in.
    """

    A: torch.Tensor
    scaled_B: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        G, K, _, k = self.A.shape
        return torch.Size((G, K, self.scaled_B.shape[2], k))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def take(self, tasks: slice | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ΔW of the selected tasks, (G, n, d, k), in ``dtype`` (default: the factors').

        A low ``dtype`` runs the product itself in it (bfloat16 GEMMs accumulate in float32 and
        round once, like casting the float32 product): twice the speed, half the bytes written.
        """
        b, a = self.scaled_B[:, tasks], self.A[:, tasks]
        if dtype is not None:
            b, a = b.to(dtype), a.to(dtype)
        return b @ a


Targets = torch.Tensor | FactorTargets


def take_targets(
    targets: Targets, tasks: slice | torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dense (G, n, d, k) targets of the selected tasks, from either form, in ``dtype``."""
    if isinstance(targets, torch.Tensor):
        picked = targets[:, tasks]
        return picked if dtype is None else picked.to(dtype)
    return targets.take(tasks, dtype)


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
        delta: (G, K, d, k) the original updates, dense, as :class:`FactorTargets`, or (MAE
            only) as the fused kernels' :class:`~hydraopt.merge.kernels.OrderKeys`.
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
    if needs_graph or distance not in _SEPARABLE:
        approx = heads[g_idx, routing] @ a[:, None]  # (G, K, d, k)
        return get_distance(distance)(take_targets(delta, slice(None)), approx)
    K, (d, k) = routing.shape[1], delta.shape[-2:]
    out = []
    for lo in range(0, K, ERROR_BLOCK):
        block = slice(lo, lo + ERROR_BLOCK)
        err = heads[g_idx, routing[:, block]] @ a[:, None]  # (G, b, d, k)
        err.sub_(take_targets(delta, block))
        out.append(_SEPARABLE[distance](err, d * k))
    return torch.cat(out, dim=1)


ERROR_BLOCK = 8  # tasks per block of the error evaluation


def distance_to_zero(delta: Targets, distance: str) -> torch.Tensor:
    """f(ΔW_i, 0) per module and task (G, K): the error of storing nothing.

    The yardstick of "relative error". The separable distances need no product with the (zero)
    heads, only the targets, ERROR_BLOCK tasks at a time.
    """
    G, K, d, k = delta.shape
    if distance not in _SEPARABLE:
        targets = take_targets(delta, slice(None))
        return get_distance(distance)(targets, torch.zeros_like(targets))
    out = []
    for lo in range(0, K, ERROR_BLOCK):
        block = take_targets(delta, slice(lo, lo + ERROR_BLOCK))
        if isinstance(delta, torch.Tensor):
            block = block.clone()  # a view of the caller's tensor: the formulas work in place
        out.append(_SEPARABLE[distance](block, d * k))
    return torch.cat(out, dim=1)


def _fused_mae_error(
    delta: torch.Tensor | OrderKeys, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor
) -> torch.Tensor:
    """:func:`hard_routed_error` for MAE with the fused kernel: M products instead of K, one pass."""
    _, l1 = head_sign_sums(heads @ a[:, None], delta, routing, with_signs=False)
    assert l1 is not None
    return l1.to(a.dtype)


# Distances of the difference alone, applied in place to a (G, b, d, k) error buffer; the same
# formulas as hydraopt.merge.distances (tests compare the two).
_SEPARABLE = {
    "mae": lambda e, n: e.abs_().sum(dim=(-2, -1)) / n,
    "mse": lambda e, n: e.square_().sum(dim=(-2, -1)) / n,
    "fro": lambda e, n: e.square_().sum(dim=(-2, -1)).sqrt(),
}


def mae_value_and_grads(
    delta: torch.Tensor | OrderKeys,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    work: torch.Tensor,
    *,
    with_loss: bool = True,
    per_head: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Mean-over-tasks MAE per module and its gradients w.r.t. A' and the heads.

    loss_g = 1/K sum_i mean|E_gi|, E_gi = H_{g,route(gi)} A'_g - ΔW_gi, so
    dloss/dH_c = sum_{i -> c} sign(E_i) A'^T / (K d k) and dloss/dA' = sum_i H^T sign(E_i) / (K d k).

    The dense products run in ``work``'s dtype (``delta`` must have it too): bfloat16 doubles to
    triples the speed on CPUs with AVX-512 BF16 and halves the memory, and costs little here
    because sign(E) is exact in any dtype; loss and gradients come back in ``a``'s dtype.

    Args:
        delta: (G, K, d, k) targets, contiguous, in ``work``'s dtype; the fused path also takes
            their :func:`~hydraopt.merge.kernels.order_keys` (what the loop passes it).
        a: (G, r, k); heads: (G, M, d, r); routing: (G, K).
        work: scratch from :func:`mae_workspace`, overwritten. Its shape picks the path: the
            fused CPU pass (:func:`_mae_fused`) or torch's (a (G, K, d, k) buffer for E).
        with_loss: compute the loss (an extra pass over E in torch; the loop skips it on most
            steps).
        per_head: torch paths: sum the tasks' sign(E) per head before the gradient products
            (None: when heads serve two tasks or more on average; see :func:`_mae_per_head`).

    Returns:
        loss (G,) or None, grad A' (G, r, k), grad heads (G, M, d, r).
    """
    G, K, d, k = delta.shape
    if work.dim() == 5:
        return _mae_fused(delta, a, heads, routing, work, with_loss=with_loss)
    if isinstance(delta, OrderKeys):
        raise ValueError("order keys need the fused path's workspace")
    if per_head if per_head is not None else 2 * heads.shape[1] <= K:
        return _mae_per_head(delta, a, heads, routing, work, with_loss=with_loss)
    M, r = heads.shape[1], a.shape[1]
    g_idx = torch.arange(G, device=heads.device)[:, None]
    routed = heads[g_idx, routing].to(work.dtype)  # (G, K, d, r)
    a_w = a.to(work.dtype)[:, None].expand(G, K, r, k)  # (G, K, r, k)
    # E = H A' - ΔW in one BLAS call: the subtraction rides in the GEMM (beta = -1), which saves
    # a full pass over the largest tensor of the step.
    torch.baddbmm(
        delta.reshape(G * K, d, k),
        routed.reshape(G * K, d, r),
        a_w.reshape(G * K, r, k),
        beta=-1,
        out=work.view(G * K, d, k),
    )
    loss = None
    if with_loss:
        acc = torch.promote_types(work.dtype, torch.float32)  # never accumulate in bf16
        l1 = torch.linalg.vector_norm(work, ord=1, dim=(2, 3), dtype=acc)  # (G, K)
        loss = (l1 / (d * k)).mean(1).to(a.dtype)  # (G,)
    torch.sign(work, out=work)
    norm = 1.0 / (K * d * k)
    g_routed = (work @ a_w.transpose(-1, -2)).to(a.dtype)  # (G, K, d, r)
    # Sum each task's gradient into its head: index_add over flattened (module, head) slots
    # (a one-hot einsum costs K x M x d x r, which dominates when M is large).
    flat = (g_idx * M + routing).flatten()  # (G K,)
    g_heads = torch.zeros(G * M, d, r, dtype=a.dtype, device=a.device)
    g_heads.index_add_(0, flat, g_routed.reshape(G * K, d, r))
    g_heads = g_heads.reshape(G, M, d, r) * norm
    g_a = (routed.transpose(-1, -2) @ work).to(a.dtype).sum(1) * norm  # (G, r, k)
    return loss, g_a, g_heads


def _mae_per_head(
    delta: torch.Tensor,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    work: torch.Tensor,
    *,
    with_loss: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`mae_value_and_grads` with the products done once per head instead of per task.

    Every task routed to head c shares H_c A', and the gradients are linear in sign(E_i), so
    dloss/dH_c = S_c A'^T and dloss/dA' = sum_c H_c^T S_c with S_c = sum_{i -> c} sign(E_i):
    3 M rank-r products per step instead of 3 K, for a few cheap elementwise passes. At M = 1,
    K = 5 that halves the step (measured in benchmarks/RESULTS.md).
    """
    G, K, d, k = delta.shape
    M = heads.shape[1]
    g_idx = torch.arange(G, device=heads.device)[:, None]
    heads_w = heads.to(work.dtype)
    a_w = a.to(work.dtype)[:, None]  # (G, 1, r, k)
    approx = heads_w @ a_w  # (G, M, d, k)
    flat = (g_idx * M + routing).flatten()  # (G K,) slot of each task's head
    if M == 1:
        torch.sub(approx, delta, out=work)  # broadcast over the tasks
    else:
        torch.index_select(approx.view(G * M, d, k), 0, flat, out=work.view(G * K, d, k))
        work.sub_(delta)
    del approx
    loss = None
    if with_loss:
        acc = torch.promote_types(work.dtype, torch.float32)
        l1 = torch.linalg.vector_norm(work, ord=1, dim=(2, 3), dtype=acc)  # (G, K)
        loss = (l1 / (d * k)).mean(1).to(a.dtype)
    torch.sign(work, out=work)
    if M == 1:
        signs = work.sum(1, keepdim=True)  # (G, 1, d, k)
    else:
        signs = work.new_zeros(G * M, d, k).index_add_(0, flat, work.view(G * K, d, k))
        signs = signs.view(G, M, d, k)
    g_a, g_heads = _head_grads(signs, heads_w, a_w[:, 0], 1.0 / (K * d * k), a.dtype)
    return loss, g_a, g_heads


def _mae_fused(
    delta: torch.Tensor | OrderKeys,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    work: torch.Tensor,
    *,
    with_loss: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`_mae_per_head` with E, sign(E), its per-head sums and the loss in one CPU pass.

    M products for X_c = H_c A', the fused kernel for S_c (never materialising the K d k error),
    2M products for the gradients: the step costs what its products and one read of the targets
    cost, whatever M is.
    """
    G, K, d, k = delta.shape
    heads_w = heads.to(delta.dtype)
    a_w = a.to(delta.dtype)
    approx, signs = work[0], work[1]  # (G, M, d, k) each, reused: no page faults per step
    torch.matmul(heads_w, a_w[:, None], out=approx)
    _, l1 = head_sign_sums(approx, delta, routing, with_loss=with_loss, out=signs)
    loss = None if l1 is None else l1.mean(1).to(a.dtype)
    g_a, g_heads = _head_grads(signs, heads_w, a_w, 1.0 / (K * d * k), a.dtype)
    return loss, g_a, g_heads


def _head_grads(
    signs: torch.Tensor, heads_w: torch.Tensor, a_w: torch.Tensor, norm: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """dloss/dA' = norm sum_c H_c^T S_c and dloss/dH_c = norm S_c A'^T, each one GEMM per module.

    Stacking the heads (M d rows) makes the sum over heads part of the GEMM, accumulated in
    float32 inside it, instead of M products and a sum.

    Args:
        signs: (G, M, d, k) S_c; heads_w: (G, M, d, r); a_w: (G, r, k), all in the work dtype.

    Returns:
        grad A' (G, r, k), grad heads (G, M, d, r), in ``dtype``.
    """
    G, M, d, k = signs.shape
    stacked = signs.reshape(G, M * d, k)
    g_a = torch.bmm(heads_w.reshape(G, M * d, -1).transpose(1, 2), stacked)  # (G, r, k)
    g_heads = torch.bmm(stacked, a_w.transpose(1, 2)).reshape(G, M, d, -1)  # (G, M, d, r)
    return g_a.to(dtype) * norm, g_heads.to(dtype) * norm


def mae_workspace(
    shape: torch.Size | tuple[int, ...],
    num_heads: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """Scratch for :func:`mae_value_and_grads` on targets of ``shape`` (G, K, d, k).

    The torch paths write E for every task, (G, K, d, k); the fused path (``fused``; None: where
    it applies, see :mod:`~hydraopt.merge.kernels`) only X and the sums per head, (2, G, M, d, k).
    """
    G, K, d, k = shape
    if fused if fused is not None else fused_available(device, dtype):
        return torch.empty(2, G, num_heads, d, k, dtype=dtype, device=device)
    return torch.empty(G, K, d, k, dtype=dtype, device=device)


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
    delta: Targets,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    *,
    distance: str,
    steps: int,
    lr: float,
    precision: Precision = "float32",
    tasks_per_step: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW on the hard-routed distance; returns the best (A', heads) per module and its errors.

    Args:
        delta: (G, K, d, k) targets, dense or as :class:`FactorTargets` (then each step forms
            only its sampled tasks' ΔW).
        a, heads, routing: the starting point (see :func:`hard_routed_error`).
        distance: registry name of f.
        steps: optimisation steps (0 returns the start, evaluated).
        lr: learning rate *relative* to the balanced factors' RMS.
        precision: dtype of the dense products of the MAE steps (``bfloat16``: about 3x faster on
            CPUs with AVX-512 BF16 and on GPUs; sign(E) is exact in it). Parameters and Adam
            state stay float32, and the final choice between iterates and the start is made on
            the float32 error, so the result is never worse than the start.
        tasks_per_step: if smaller than K, each step uses that many tasks drawn at random (an
            unbiased estimate of the gradient): the cost of a step stops growing with K. The
            start and the last iterate are then compared on the full float32 error.
        generator: draws the tasks (required when sampling).

    Returns:
        A' (G, r, k), heads (G, M, d, r), float32 error per module and task (G, K).
    """
    a, heads = balance(a, heads)
    with torch.no_grad():
        start_tasks = hard_routed_error(delta, a, heads, routing, distance)
    if steps <= 0:
        return a, heads, start_tasks
    start_err = start_tasks.mean(1)
    K = delta.shape[1]
    sampled = tasks_per_step is not None and tasks_per_step < K
    if sampled and generator is None:
        raise ValueError("sampling tasks needs a generator")
    low = PRECISIONS[precision] if distance == "mae" else delta.dtype
    # Losses seen in the loop can pick the best iterate only if they are comparable with each
    # other (same tasks); they are compared with the float32 start only after the loop. A loss
    # costs an extra pass over E, so the low-precision loop looks at it every CHECK_EVERY steps.
    track = not sampled
    check_every = 1 if low == delta.dtype else CHECK_EVERY
    best_a, best_h = a.clone(), heads.clone()
    best_err = torch.full_like(start_err, float("inf"))

    # Optimise unit-RMS copies, one scale per module, so one learning rate suits every module.
    scale = a.square().mean(dim=(1, 2)).sqrt().clamp_min(1e-30)  # (G,)
    s_a, s_h = scale[:, None, None], scale[:, None, None, None]
    a_p = (a / s_a).requires_grad_(distance != "mae")
    h_p = (heads / s_h).requires_grad_(distance != "mae")
    adam = Adam([a_p, h_p])

    def keep_better(err: torch.Tensor) -> torch.Tensor:
        """Keep the current point where ``err`` (G,) beats the best so far; returns where."""
        nonlocal best_err
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            best_a[better] = (a_p.detach() * s_a)[better]
            best_h[better] = (h_p.detach() * s_h)[better]
        return better

    def current_error(target: Targets | OrderKeys, route: torch.Tensor) -> torch.Tensor:
        return hard_routed_error(target, a_p * s_a, h_p * s_h, route, distance)  # (G, n)

    # Dense low-precision targets only when every step uses every task; sampled steps form
    # their few tasks' ΔW on the fly.
    dense = None if sampled else take_targets(delta, slice(None), low)
    batch = min(tasks_per_step, K) if sampled and tasks_per_step is not None else K
    mae_work = (
        # Sampled steps (many adapters): forming the sampled targets dominates, so the torch
        # path, which needs no kernel runtime (memory flat in K), costs the same.
        mae_workspace(
            (delta.shape[0], batch, *delta.shape[2:]),
            heads.shape[1],
            low,
            a.device,
            fused=False if sampled else None,
        )
        if distance == "mae"
        else None
    )
    delta_w: torch.Tensor | OrderKeys | None = dense
    if dense is not None and mae_work is not None and mae_work.dim() == 5:
        # The fused steps compare every X with the same targets: map them to keys once.
        delta_w = order_keys(dense)
    del dense
    for step in range(steps):
        check = track and step % check_every == 0
        target: torch.Tensor | OrderKeys
        if sampled and generator is not None:
            idx = torch.randperm(K, generator=generator, device=generator.device)[:batch]
            idx = idx.to(a.device)
            target, route = take_targets(delta, idx, low), routing[:, idx]
        elif delta_w is not None:
            target, route = delta_w, routing
        if mae_work is not None:
            # Hand-written MAE gradient: 2x faster than autograd here (one reused buffer,
            # no graph), and this loop is where a default merge spends its time.
            with torch.no_grad():
                per_module, g_a, g_h = mae_value_and_grads(
                    target, a_p * s_a, h_p * s_h, route, mae_work, with_loss=check
                )
                grads = [g_a * s_a, g_h * s_h]
        else:
            per_module = current_error(target, route).mean(1)
            # Modules are independent; summing keeps each module's gradient its own.
            grads = list(torch.autograd.grad(per_module.sum(), [a_p, h_p]))
        if check and per_module is not None:
            # The loss is evaluated at the current point: record it before stepping away.
            with torch.no_grad():
                keep_better(per_module.detach())
        # Cosine decay: large early steps leave the Frobenius optimum fast, small late steps
        # settle into the L1 optimum instead of rattling around it.
        adam.step(grads, cosine_lr(lr, step, steps))
    with torch.no_grad():
        # Low-precision loop: the last iterate is judged on the loop's own loss, and only the
        # winner gets a float32 evaluation (each costs M float32 products and a pass over the
        # targets). Otherwise the last iterate is evaluated like the others.
        judged_low = track and low != delta.dtype
        if judged_low:
            assert delta_w is not None  # tracked: every step saw every task, densely
            last = hard_routed_error(
                delta_w, (a_p * s_a).to(low), (h_p * s_h).to(low), routing, distance
            )
            keep_better(last.mean(1).to(best_err.dtype))
        del mae_work, delta_w
        if judged_low:
            best_tasks = hard_routed_error(delta, best_a, best_h, routing, distance)
        else:
            last = current_error(delta, routing)
            if bool(keep_better(last.mean(1)).all()):
                best_tasks = last
            else:  # an earlier iterate won somewhere: the loop saw only its mean
                best_tasks = hard_routed_error(delta, best_a, best_h, routing, distance)
        best_err = best_tasks.mean(1)
        worse = start_err <= best_err  # float32 comparison with the start; ties keep the start
        best_a[worse], best_h[worse] = a[worse], heads[worse]
        best_tasks[worse] = start_tasks[worse]
    return best_a, best_h, best_tasks


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """Cosine decay from ``lr`` at step 0 towards 0 at ``steps`` (torch's CosineAnnealingLR)."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


class Adam:
    """Adam (torch's defaults and update, no weight decay) on a few tensors, updated in place.

    Hand-written because ``torch.optim`` costs seconds on its first use in a process (it pulls
    in the compiler stack) — more than a whole small merge — and a per-step overhead that shows
    on the many small modules of a model.
    """

    def __init__(
        self, params: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps=1e-8
    ):
        self.params = params
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        bias1, bias2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bias1)


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
