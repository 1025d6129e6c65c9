"""Refinement of a shared basis (U, V, cores) on any distance, and its measured errors.

The closed form (:mod:`shared_basis`) is exact for the squared Frobenius error; for MAE (the
default, as HydraOpt) a short Adam run from it lowers the deployed error. Each of U, V and the
cores is optimised as a unit-RMS copy with one scale per module (Adam's steps are about lr in
every coordinate, and the three tensors differ in magnitude by orders). The best iterate per
module is kept and compared with the start on the full float32 error, so the result is never
worse than the closed form.
"""

from __future__ import annotations

import torch

from hydraopt.merge.adam import Adam, cosine_lr
from hydraopt.merge.distances import get_distance
from hydraopt.merge.measure import distance_to_zero, hard_routed_error
from hydraopt.merge.shared_basis import Core, MergedBasisStack, closed_form, task_heads
from hydraopt.merge.targets import FactorTargets, Targets, take_targets
from hydraopt.types import Measured


def basis_error(
    delta: Targets, U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor, distance: str
) -> torch.Tensor:
    """f(ΔW_i, U S_i Vᵀ) per module and task (G, K).

    The same evaluation as HydraOpt's hard-routed error (:func:`hard_routed_error`, blocked
    over tasks, fused MAE kernel where it applies), with A' = Vᵀ and one head U S_i per task.
    """
    G, K = cores.shape[:2]
    routing = torch.arange(K, device=U.device).expand(G, K)
    return hard_routed_error(delta, V.transpose(1, 2), task_heads(U, cores), routing, distance)


def measure(stack: MergedBasisStack, delta: Targets, distance: str) -> MergedBasisStack:
    """``stack`` with its per-task errors on ``distance`` and the errors of storing nothing."""
    err = basis_error(delta, stack.U, stack.V, stack.cores, distance)
    zero = distance_to_zero(delta, distance)
    return _with(stack, stack.U, stack.V, stack.cores, Measured(distance, err, zero))


def _with(
    stack: MergedBasisStack,
    U: torch.Tensor,
    V: torch.Tensor,
    cores: torch.Tensor,
    measured: Measured | None,
) -> MergedBasisStack:
    return MergedBasisStack(U, V, cores, stack.squared_error, measured)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-module RMS (G,) of a (G, ...) tensor, shaped to broadcast against it."""
    rms = x.square().flatten(1).mean(1).sqrt().clamp_min(1e-30)
    return rms.reshape(-1, *([1] * (x.dim() - 1)))


def refine_basis(
    stack: MergedBasisStack,
    delta: Targets,
    *,
    distance: str,
    steps: int,
    lr: float,
) -> MergedBasisStack:
    """Adam on Σ_i f(ΔW_i, U S_i Vᵀ) from ``stack``; the best iterate per module, measured.

    Args:
        stack: the starting point (the closed form).
        delta: (G, K, d, k) targets, dense or as factors (formed densely once here: the
            refinement's products are dense anyway).
        distance: registry name of f.
        steps: Adam steps (0: the start, measured).
        lr: learning rate relative to each tensor's per-module RMS (cosine decay to 0).

    Returns:
        The refined stack with ``measured`` set (float32 errors); ``squared_error`` is the
        start's (the closed form's), as refinement trades it for the chosen distance.
    """
    start = measure(stack, delta, distance)
    if steps <= 0:
        return start
    assert start.measured is not None
    start_err = start.measured.error.mean(1)  # (G,)
    targets = take_targets(delta, slice(None))  # (G, K, d, k)
    f = get_distance(distance)
    scales = [_rms(t) for t in (stack.U, stack.V, stack.cores)]
    params = [
        (t / s).detach().requires_grad_(True)
        for t, s in zip((stack.U, stack.V, stack.cores), scales, strict=True)
    ]
    best = [t.detach().clone() for t in (stack.U, stack.V, stack.cores)]
    best_err = torch.full_like(start_err, float("inf"))
    adam = Adam(params)

    def point() -> list[torch.Tensor]:
        return [p * s for p, s in zip(params, scales, strict=True)]

    def loss_of(U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
        approx = task_heads(U, cores) @ V.transpose(1, 2)[:, None]  # (G, K, d, k)
        return f(targets, approx).mean(1)  # (G,)

    def keep_better(err: torch.Tensor) -> None:
        nonlocal best_err
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            for b, cur in zip(best, point(), strict=True):
                b[better] = cur.detach()[better]

    for step in range(steps):
        per_module = loss_of(*point())
        # The loss is at the current point: record it before stepping away. Modules are
        # independent, so the gradient of the sum is each module's own.
        keep_better(per_module.detach())
        grads = list(torch.autograd.grad(per_module.sum(), params))
        adam.step(grads, cosine_lr(lr, step, steps))
    with torch.no_grad():
        keep_better(loss_of(*point()))
        U, V, cores = best
        best_tasks = basis_error(delta, U, V, cores, distance)  # the start's float32 measure
        worse = start_err <= best_tasks.mean(1)  # ties keep the start
        U[worse], V[worse], cores[worse] = stack.U[worse], stack.V[worse], stack.cores[worse]
        assert start.measured is not None
        best_tasks[worse] = start.measured.error[worse]
    return _with(stack, U, V, cores, Measured(distance, best_tasks, start.measured.zero))


def fit_shared_basis(
    A: torch.Tensor,
    scaled_B: torch.Tensor,
    rank: int,
    *,
    core: Core = "full",
    sweeps: int = 8,
    cp_sweeps: int = 30,
    sweep_tol: float = 1e-3,
    distance: str = "mae",
    refine_steps: int = 0,
    refine_lr: float = 0.02,
    delta: Targets | None = None,
) -> MergedBasisStack:
    """Closed form (HOSVD + sweeps), then optional refinement on ``distance``, measured.

    Args:
        A: (G, K, r, k); scaled_B: (G, K, d, r), LoRA scale folded in.
        rank: R of every module of the group.
        cp_sweeps: diagonal cores only (see :class:`SharedBasisConfig`).
        sweep_tol: early stop of the sweeps (see :class:`SharedBasisConfig`).
        delta: the targets for refinement and measurement (default: :class:`FactorTargets`
            of A and B, formed a few tasks at a time).

    Returns:
        The stack with ``measured`` errors on ``distance``. The squared Frobenius optimum is
        not refined (mse is its own closed form), as in HydraOpt.
    """
    stack = closed_form(A, scaled_B, rank, core, sweeps, cp_sweeps, sweep_tol)
    targets: Targets = delta if delta is not None else FactorTargets(A, scaled_B)
    steps = refine_steps if distance != "mse" else 0
    return refine_basis(stack, targets, distance=distance, steps=steps, lr=refine_lr)
