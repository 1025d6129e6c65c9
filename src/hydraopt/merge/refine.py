"""Gradient refinement with the routing held fixed: LoRA's (A', heads) in the one loop.

The closed form is exact for the squared Frobenius distance; for MAE (the paper's default), the
unsquared Frobenius norm or the cosine distance, a short Adam run from it lowers the *hard-routed*
error, which is what gets deployed. The best iterate per module is kept, so refinement can only
improve on its starting point.

:func:`~hydraopt.merge.refine_loop.refine_parameters` is the loop (unit-RMS copies, Adam with a
cosine schedule, the best iterate per module); a
:class:`~hydraopt.merge.refine_loop.Parameterisation` supplies what is optimised: LoRA's
(A', heads) here (:class:`FactorRefinement`, used by :func:`refine`), VeRA's λ vectors in
:mod:`hydraopt.kinds.vera.merge`. The pieces live one job per module: targets
(:mod:`~hydraopt.merge.targets`), measured errors (:mod:`~hydraopt.merge.measure`, formulas from
:mod:`~hydraopt.merge.distances`), the MAE gradients (:mod:`~hydraopt.merge.gradients`), the
optimiser and schedule (:mod:`~hydraopt.merge.adam`); the precision is chosen outside the core
(:func:`hydraopt.devices.resolve_precision`).
"""

from __future__ import annotations

from typing import Any

import torch

from hydraopt.devices import Precision
from hydraopt.merge.adam import Adam, cosine_lr, module_rms
from hydraopt.merge.gradients import MaeWorkspace, mae_value_and_grads, mae_workspace
from hydraopt.merge.kernels import OrderKeys, order_keys
from hydraopt.merge.measure import distance_to_zero, hard_routed_error, hard_routed_errors
from hydraopt.merge.refine_loop import (
    BestFrom,
    MeasuresTogether,
    Parameterisation,
    refine_parameters,
)
from hydraopt.merge.targets import FactorTargets, Targets, take_targets
from hydraopt.types import Measured

# Re-exported for callers that import the refinement's pieces from here (the loop's names too).
__all__ = [
    "Adam",
    "BestFrom",
    "FactorRefinement",
    "FactorTargets",
    "MeasuresTogether",
    "Parameterisation",
    "Targets",
    "balance",
    "cosine_lr",
    "distance_to_zero",
    "hard_routed_error",
    "refine",
    "refine_measured",
    "refine_parameters",
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


class FactorRefinement:
    """LoRA's parameterisation: the point is (A' (G, r, k), heads (G, M, d, r)), ΔW'_i =
    heads[route(i)] @ A'.

    The loop's losses may be sampled (``tasks_per_step`` < K) or in low precision, so they are
    compared with each other only and the winner with the float32 start after the loop
    (``best_from = "loop"``). MAE steps use the hand-written gradient and look at the loss every
    CHECK_EVERY steps (it costs an extra pass over E); the other distances use autograd.
    """

    best_from: BestFrom = "loop"

    def __init__(
        self,
        delta: Targets,
        routing: torch.Tensor,
        *,
        distance: str,
        num_heads: int,
        precision: Precision,
        tasks_per_step: int | None,
        generator: torch.Generator | None,
        with_zero: bool = False,
        head_scale: float = 1.0,
    ):
        self.delta, self.routing, self.distance, self.num_heads = (
            delta,
            routing,
            distance,
            num_heads,
        )
        # The zero yardstick f(ΔW_i, 0), measured in the same pass as :meth:`errors` when asked.
        self.with_zero = with_zero
        self.zero: torch.Tensor | None = None
        # Head-magnitude calibration (M = 1): the errors of every point with its heads times
        # head_scale, from the same pass as :meth:`errors` (at K = 1,000 a pass of its own was a
        # fifth of the merge), and, once the loop has chosen, the chosen point's (G, K).
        self.head_scale = head_scale
        self.scaled: list[torch.Tensor] | None = None
        self.scaled_chosen: torch.Tensor | None = None
        self.K = delta.shape[1]
        self.sampled = tasks_per_step is not None and tasks_per_step < self.K
        self.generator = generator
        self.batch = (
            min(tasks_per_step, self.K) if tasks_per_step is not None and self.sampled else self.K
        )
        self.low = PRECISIONS[precision] if distance == "mae" else delta.dtype
        self.hand_written = distance == "mae"
        # Losses seen in the loop can pick the best iterate only if they are comparable with
        # each other (same tasks). A MAE loss costs an extra pass over E (in float32 as much as
        # the signs themselves), so the hand-written steps look at it every CHECK_EVERY steps;
        # autograd's comes with the step.
        self.check_every = None if self.sampled else (CHECK_EVERY if self.hand_written else 1)
        self.work: MaeWorkspace | None = None
        self.targets: torch.Tensor | OrderKeys | None = None
        self.sample_buf: torch.Tensor | None = None

    def scales(self, point: list[torch.Tensor]) -> list[torch.Tensor]:
        scale = module_rms(point[0])  # (G,): balanced, so one scale suits A' and the heads
        return [scale[:, None, None], scale[:, None, None, None]]

    def error(self, point: list[torch.Tensor]) -> torch.Tensor:
        return hard_routed_error(self.delta, point[0], point[1], self.routing, self.distance)

    def errors(self, points: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        pairs = [(p[0], p[1]) for p in points]
        if self.head_scale != 1.0:
            pairs += [(a, h * self.head_scale) for a, h in pairs[: len(points)]]
        with_zero = self.with_zero and self.zero is None
        errs, zero = hard_routed_errors(
            self.delta, pairs, self.routing, self.distance, with_zero=with_zero
        )
        self.zero = zero if with_zero else self.zero
        if self.head_scale != 1.0:
            self.scaled = errs[len(points) :]
        return errs[: len(points)]

    def chose(self, kept_start: torch.Tensor) -> None:
        if self.scaled is not None:
            start, last = self.scaled
            self.scaled_chosen = torch.where(kept_start[:, None], start, last)

    def release(self) -> None:
        self.work = self.targets = self.sample_buf = None

    def begin(self) -> None:
        if self.sampled and self.generator is None:
            raise ValueError("sampling tasks needs a generator")
        # Dense low-precision targets only when every step uses every task; sampled steps form
        # their few tasks' ΔW on the fly.
        dense = None if self.sampled else take_targets(self.delta, slice(None), self.low)
        if self.hand_written:
            G, _, d, k = self.delta.shape
            # Sampled steps (many adapters): forming the sampled targets dominates, so the torch
            # path, which needs no kernel runtime (memory flat in K), costs the same.
            self.work = mae_workspace(
                (G, self.batch, d, k),
                self.num_heads,
                self.low,
                self.routing.device,
                fused=False if self.sampled else None,
                # Many adapters at M = K: the heads' gradient buffer kept across steps.
                heads_grad=(
                    (self.delta.A.shape[2], self.delta.dtype)
                    if self.sampled and isinstance(self.delta, FactorTargets)
                    else None
                ),
            )
        self.targets = dense
        if self.sampled and isinstance(self.delta, FactorTargets):
            # Each step's sampled ΔW into one reused buffer: a fresh one per step faults its
            # pages in anew (G x batch x d x k, 64 MiB in bf16 at 1B shape), as slow as the GEMM.
            G, _, d, k = self.delta.shape
            self.sample_buf = torch.empty(
                G, self.batch, d, k, dtype=self.low, device=self.routing.device
            )
        if dense is not None and self.work is not None and self.work.fused:
            # The fused steps compare every X with the same targets: map them to keys once.
            self.targets = order_keys(dense)

    def step_targets(self) -> tuple[torch.Tensor | OrderKeys, torch.Tensor]:
        """This step's targets and routing: a random batch of tasks, or all of them."""
        if self.sampled and self.generator is not None:
            gen = self.generator
            idx = torch.randperm(self.K, generator=gen, device=gen.device)[: self.batch]
            idx = idx.to(self.routing.device)
            if self.sample_buf is not None and isinstance(self.delta, FactorTargets):
                # FactorTargets.take(idx, self.low), written into the reused buffer
                b, a = self.delta.scaled_B[:, idx], self.delta.A[:, idx]
                taken = torch.matmul(b.to(self.low), a.to(self.low), out=self.sample_buf)
                return taken, self.routing[:, idx]
            return take_targets(self.delta, idx, self.low), self.routing[:, idx]
        assert self.targets is not None  # not sampled: begin() formed every task's targets
        return self.targets, self.routing

    def loss(self, point: list[torch.Tensor]) -> torch.Tensor:
        target, route = self.step_targets()
        return hard_routed_error(target, point[0], point[1], route, self.distance).mean(1)

    def loss_and_grads(
        self, point: list[torch.Tensor], with_loss: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        # Hand-written MAE gradient: 2x faster than autograd here (one reused buffer, no graph),
        # and this loop is where a default merge spends its time.
        target, route = self.step_targets()
        assert self.work is not None
        loss, g_a, g_h = mae_value_and_grads(
            target, point[0], point[1], route, self.work, with_loss=with_loss
        )
        return loss, [g_a, g_h]

    def finish(self, point: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        # Low-precision loop: the last iterate is judged on the loop's own loss, and only the
        # winner gets a float32 evaluation (each costs M float32 products and a pass over the
        # targets). Otherwise the last iterate is evaluated like the others.
        judged_low = not self.sampled and self.low != self.delta.dtype
        if judged_low:
            assert self.targets is not None  # tracked: every step saw every task, densely
            low = [t.to(self.low) for t in point]
            last = hard_routed_error(self.targets, low[0], low[1], self.routing, self.distance)
        self.release()
        if judged_low:
            return last, False
        return self.error(point), True


def refine(
    delta: Targets, a: torch.Tensor, heads: torch.Tensor, routing: torch.Tensor, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW on the hard-routed distance; see :func:`_refine` (its keyword arguments)."""
    best_a, best_h, err, _, _ = _refine(delta, a, heads, routing, **kw)
    return best_a, best_h, err


def _refine(
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
    with_zero: bool = False,
    head_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
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
        with_zero: also measure f(ΔW_i, 0) where the final evaluation passes over the targets
            anyway (None where it did not).
        head_scale: also measure the result with its heads times this, where the final
            evaluation measures start and last iterate together (None where it did not).

    Returns:
        A' (G, r, k), heads (G, M, d, r), float32 error per module and task (G, K), the zero
        yardstick (G, K) or None, the error with the heads scaled (G, K) or None.
    """
    a, heads = balance(a, heads)
    problem = FactorRefinement(
        delta,
        routing,
        distance=distance,
        num_heads=heads.shape[1],
        precision=precision,
        tasks_per_step=tasks_per_step,
        generator=generator,
        with_zero=with_zero,
        head_scale=head_scale,
    )
    (best_a, best_h), best_tasks = refine_parameters(
        problem, [a, heads], steps=steps, lr=lr, momentum=momentum
    )
    return best_a, best_h, best_tasks, problem.zero, problem.scaled_chosen


def refine_measured(
    delta: Targets,
    a: torch.Tensor,
    heads: torch.Tensor,
    routing: torch.Tensor,
    *,
    head_scale: float = 1.0,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor, Measured, Measured | None]:
    """:func:`refine` (same arguments), with the errors and the zero yardstick as a
    :class:`Measured`; the yardstick comes from the last evaluation's pass when it could.

    With ``head_scale`` != 1 also the errors of the result with its heads times head_scale, where
    the last evaluation measured them in its pass (else None: measure them afterwards).
    """
    best_a, best_h, err, zero, scaled = _refine(
        delta, a, heads, routing, with_zero=True, head_scale=head_scale, **kw
    )
    if zero is None:
        zero = distance_to_zero(delta, kw["distance"])
    distance = kw["distance"]
    scaled_measured = None if scaled is None else Measured(distance, scaled, zero)
    return best_a, best_h, Measured(distance, err, zero), scaled_measured
