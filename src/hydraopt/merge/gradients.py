"""Hand-written gradients of the mean hard-routed MAE w.r.t. (A', heads), no autograd graph.

2x faster than autograd on the refinement's dense tensors (one reused buffer, no graph), and the
MAE refinement is where a default merge spends its time. Three paths compute the same numbers:

- per task: E for every task in one GEMM, the gradients summed into the heads afterwards;
- per head: the products done once per head (M < K), the tasks' sign(E) summed per head;
- fused (CPU, :mod:`~hydraopt.merge.kernels`): E, sign(E), its per-head sums and the loss in one
  pass, never materialising the K d k error.

The workspace says which: :func:`mae_workspace` allocates the fused path's per-head scratch or
the torch paths' per-task buffer, and records which it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydraopt.merge.kernels import OrderKeys, fused_available, head_sign_sums


@dataclass(frozen=True)
class MaeWorkspace:
    """Scratch of :func:`mae_value_and_grads`, reused across steps (no page faults per step).

    Attributes:
        buffer: fused: (2, G, M, d, k), X_c and S_c per head; else (G, K, d, k), E per task.
        fused: whether the fused CPU kernels run the step.
        heads_grad: the per-task path's (G M, d, r) gradient of the heads, or None (allocated
            per step): at M = K with many adapters 256 MiB per 1B module, whose fresh pages
            cost more than zeroing it. The gradient returned is then this buffer, valid until
            the next call.
    """

    buffer: torch.Tensor
    fused: bool
    heads_grad: torch.Tensor | None = None


def mae_value_and_grads(
    delta: torch.Tensor | OrderKeys,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    workspace: MaeWorkspace,
    *,
    with_loss: bool = True,
    per_head: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Mean-over-tasks MAE per module and its gradients w.r.t. A' and the heads.

    loss_g = 1/K sum_i mean|E_gi|, E_gi = H_{g,route(gi)} A'_g - ΔW_gi, so
    dloss/dH_c = sum_{i -> c} sign(E_i) A'^T / (K d k) and dloss/dA' = sum_i H^T sign(E_i) / (K d k).

    The dense products run in the workspace's dtype (``delta`` must have it too): bfloat16 doubles to
    triples the speed on CPUs with AVX-512 BF16 and halves the memory, and costs little here
    because sign(E) is exact in any dtype; loss and gradients come back in ``a``'s dtype.

    Args:
        delta: (G, K, d, k) targets, contiguous, in the workspace's dtype; the fused path also takes
            their :func:`~hydraopt.merge.kernels.order_keys` (what the loop passes it).
        a: (G, r, k); heads: (G, M, d, r); routing: (G, K).
        workspace: scratch from :func:`mae_workspace`, overwritten; it picks the path: the fused
            CPU pass (:func:`_mae_fused`) or torch's (a (G, K, d, k) buffer for E).
        with_loss: compute the loss (an extra pass over E in torch; the loop skips it on most
            steps).
        per_head: torch paths: sum the tasks' sign(E) per head before the gradient products
            (None: when heads serve two tasks or more on average; see :func:`_mae_per_head`).

    Returns:
        loss (G,) or None, grad A' (G, r, k), grad heads (G, M, d, r).
    """
    G, K, d, k = delta.shape
    work = workspace.buffer
    if workspace.fused:
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
    kept = workspace.heads_grad
    if kept is not None and kept.shape == (G * M, d, r) and kept.dtype == a.dtype:
        g_heads = kept.zero_()
    else:
        g_heads = torch.zeros(G * M, d, r, dtype=a.dtype, device=a.device)
    g_heads.index_add_(0, flat, g_routed.reshape(G * K, d, r))
    g_heads = g_heads.reshape(G, M, d, r).mul_(norm)  # in place: (G, M, d, r) is large at M = K
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
    M, r = heads.shape[1], a.shape[1]
    # The heads stacked as M d rows share A': one GEMM per module, written in place. A
    # broadcast matmul into ``out`` costs a quarter more at M = 2 (same numbers).
    torch.bmm(heads_w.reshape(G, M * d, r), a_w, out=approx.view(G, M * d, k))
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
    heads_grad: tuple[int, torch.dtype] | None = None,
) -> MaeWorkspace:
    """Scratch for :func:`mae_value_and_grads` on targets of ``shape`` (G, K, d, k).

    The torch paths write E for every task, (G, K, d, k); the fused path (``fused``; None: where
    it applies, see :mod:`~hydraopt.merge.kernels`) only X and the sums per head, (2, G, M, d, k).
    ``heads_grad`` (rank r, parameter dtype): also keep the per-task path's heads gradient
    buffer (where that path runs: more than K / 2 heads).
    """
    G, K, d, k = shape
    if fused if fused is not None else fused_available(device, dtype):
        return MaeWorkspace(torch.empty(2, G, num_heads, d, k, dtype=dtype, device=device), True)
    kept = None
    if heads_grad is not None and 2 * num_heads > K:
        rank, param_dtype = heads_grad
        kept = torch.empty(G * num_heads, d, rank, dtype=param_dtype, device=device)
    return MaeWorkspace(torch.empty(G, K, d, k, dtype=dtype, device=device), False, kept)
