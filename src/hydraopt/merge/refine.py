"""Gradient refinement of (A', heads) on any distance, with the routing held fixed: the loop.

The closed form is exact for the squared Frobenius distance; for MAE (the paper's default), the
unsquared Frobenius norm or the cosine distance, a short Adam run from it lowers the *hard-routed*
error, which is what gets deployed. The best iterate per module is kept, so refinement can only
improve on its starting point.

The pieces live one job per module: targets (:mod:`~hydraopt.merge.targets`), measured errors
(:mod:`~hydraopt.merge.measure`, formulas from :mod:`~hydraopt.merge.distances`), the MAE
gradients (:mod:`~hydraopt.merge.gradients`), the optimiser and schedule
(:mod:`~hydraopt.merge.adam`); the precision is chosen outside the core
(:func:`hydraopt.devices.resolve_precision`).
"""

from __future__ import annotations

import torch

from hydraopt.devices import Precision
from hydraopt.merge.adam import Adam, BestIterate, cosine_lr, module_rms
from hydraopt.merge.gradients import mae_value_and_grads, mae_workspace
from hydraopt.merge.kernels import OrderKeys, order_keys
from hydraopt.merge.measure import distance_to_zero, hard_routed_error
from hydraopt.merge.targets import FactorTargets, Targets, take_targets

# Re-exported for callers that import the refinement's pieces from here (shared_basis_refine).
__all__ = [
    "Adam",
    "FactorTargets",
    "Targets",
    "balance",
    "cosine_lr",
    "distance_to_zero",
    "hard_routed_error",
    "refine",
    "take_targets",
]

CHECK_EVERY = 10  # MAE refinement: steps between looks at the loss

PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def balance(a: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale A' up and heads down (same product) so both have the same RMS per module.

    Adam's steps are about lr in every coordinate, so factors of very different magnitude would
    move at very different relative speeds; balancing lets one learning rate suit both.
    """
    c = (module_rms(heads) / module_rms(a)).sqrt()  # (G,)
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
    momentum: float = 0.9,
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
        momentum: Adam's beta1 (torch's 0.9 unless the schedule says otherwise).

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
    # other (same tasks); they are compared with the float32 start only after the loop. A MAE
    # loss costs an extra pass over E (in float32 as much as the signs themselves), so the
    # hand-written MAE steps look at it every CHECK_EVERY steps; autograd's comes with the step.
    track = not sampled
    check_every = CHECK_EVERY if distance == "mae" else 1
    # The loop's losses are compared with each other only (inf: the first one seen wins).
    best = BestIterate([a, heads], torch.full_like(start_err, float("inf")))

    # Optimise unit-RMS copies, one scale per module, so one learning rate suits every module.
    scale = module_rms(a)  # (G,)
    s_a, s_h = scale[:, None, None], scale[:, None, None, None]
    a_p = (a / s_a).requires_grad_(distance != "mae")
    h_p = (heads / s_h).requires_grad_(distance != "mae")
    adam = Adam([a_p, h_p], betas=(momentum, 0.999))

    def keep_better(err: torch.Tensor) -> torch.Tensor:
        """Keep the current point where ``err`` (G,) beats the best so far; returns where."""
        return best.offer(err, lambda: [a_p.detach() * s_a, h_p.detach() * s_h])

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
    if dense is not None and mae_work is not None and mae_work.fused:
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
            keep_better(last.mean(1).to(best.err.dtype))
        del mae_work, delta_w
        best_a, best_h = best.tensors
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
