"""The refinement loop with the routing held fixed, for any parameterisation (LoRA's, VeRA's).

:func:`refine_parameters` runs Adam on unit-RMS copies with a cosine schedule and keeps the best
iterate per module, so refinement can only improve on its starting point; a
:class:`Parameterisation` supplies what is optimised and how its error is measured (LoRA's
(A', heads) in :mod:`~hydraopt.merge.refine`, VeRA's λ vectors in
:mod:`hydraopt.kinds.vera.merge`).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch

from hydraopt.merge.adam import Adam, BestIterate, cosine_lr

# Where the best-so-far starts. "start": at the start point and its float32 error, so a loop loss
# replaces it only by beating that error (the loop's losses must then be comparable with it:
# every task, float32). "loop": at +inf, so the loop's losses are compared only with each other
# (they may be sampled or low precision) and the winner with the start only after the loop, on
# its float32 error; ties keep the start.
BestFrom = Literal["start", "loop"]


class Parameterisation(Protocol):
    """What :func:`refine_parameters` optimises: a kind's tensors, their errors and gradients.

    A *point* is the list of the kind's tensors, (G, ...) each, at their true scale; the loop
    optimises unit-RMS copies and hands the methods points.

    Attributes:
        best_from: where the best-so-far starts (:data:`BestFrom`).
        check_every: steps between looks at the loop's loss; None: never (sampled losses).
        hand_written: gradients come from :meth:`loss_and_grads` (no autograd graph); otherwise
            from autograd through :meth:`loss`.
    """

    best_from: BestFrom
    check_every: int | None
    hand_written: bool

    def scales(self, point: list[torch.Tensor]) -> list[torch.Tensor]:
        """One RMS per module for each tensor, shaped to broadcast against it."""
        ...

    def error(self, point: list[torch.Tensor]) -> torch.Tensor:
        """The float32 hard-routed error (G, K) of ``point`` on every task."""
        ...

    def begin(self) -> None:
        """Set up what the steps reuse (workspaces, targets in the loop's precision)."""
        ...

    def loss(self, point: list[torch.Tensor]) -> torch.Tensor:
        """This step's mean-over-tasks loss (G,), differentiable w.r.t. ``point``."""
        ...

    def loss_and_grads(
        self, point: list[torch.Tensor], with_loss: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """This step's loss (G,) (None if not ``with_loss`` and it costs extra) and gradients."""
        ...

    def finish(self, point: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The last iterate's error (G, K) and whether it is :meth:`error`'s (float32, every
        task); frees what :meth:`begin` set up."""
        ...


@runtime_checkable
class MeasuresTogether(Protocol):
    """A :class:`Parameterisation` that measures several points in one pass over its targets."""

    def errors(self, points: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """:meth:`Parameterisation.error` of each point, the same numbers, in one pass."""
        ...

    def release(self) -> None:
        """Free what :meth:`Parameterisation.begin` set up (:meth:`finish` without measuring)."""
        ...

    def chose(self, kept_start: torch.Tensor) -> None:
        """Told, after :meth:`errors` of (start, last iterate), where (G,) the start was kept."""
        ...


def refine_parameters(
    problem: Parameterisation,
    start: list[torch.Tensor],
    *,
    steps: int,
    lr: float,
    momentum: float = 0.9,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Adam (cosine schedule, no weight decay) from ``start``; the best point per module.

    Args:
        problem: what is optimised and how its error is measured.
        start: the starting point, (G, ...) tensors.
        steps: optimisation steps (0 returns the start, evaluated).
        lr: learning rate *relative* to each tensor's RMS per module.
        momentum: Adam's beta1 (torch's 0.9 unless the schedule says otherwise).

    Returns:
        The best point per module (never worse than the start) and its float32 error (G, K).
    """
    # A loop that looks at no loss (sampled steps) ends on its last iterate, and compares it with
    # the start only after the loop: a problem that measures points together then measures both
    # in one pass there (at K = 1,000 forming the targets, not the steps, dominates the merge).
    together = (
        problem
        if steps > 0
        and problem.best_from == "loop"
        and problem.check_every is None
        and isinstance(problem, MeasuresTogether)
        else None
    )
    if together is None:
        with torch.no_grad():
            start_tasks = problem.error(start)
        if steps <= 0:
            return start, start_tasks
        start_err = start_tasks.mean(1)
    G = start[0].shape[0]
    unbeaten = torch.full((G,), float("inf"), device=start[0].device)
    best = BestIterate(start, start_err if problem.best_from == "start" else unbeaten)

    # Optimise unit-RMS copies, one scale per module, so one learning rate suits every module.
    scales = problem.scales(start)
    params = [
        (t / s).requires_grad_(not problem.hand_written) for t, s in zip(start, scales, strict=True)
    ]
    adam = Adam(params, betas=(momentum, 0.999))

    def current() -> list[torch.Tensor]:
        return [p * s for p, s in zip(params, scales, strict=True)]

    def keep_better(err: torch.Tensor) -> torch.Tensor:
        """Keep the current point where ``err`` (G,) beats the best so far; returns where."""
        return best.offer(
            err, lambda: [p.detach() * s for p, s in zip(params, scales, strict=True)]
        )

    # Hand-written steps: each step's point and scaled gradients go into buffers reused by every
    # step (the same products p * s, g * s). At M = K with 1,000 adapters the heads are 256 MiB
    # per module, and a fresh tensor that size faults its pages in anew every step.
    point_bufs = [torch.empty_like(p) for p in params] if problem.hand_written else []
    grad_bufs = [torch.empty_like(p) for p in params] if problem.hand_written else []
    problem.begin()
    for step in range(steps):
        check = problem.check_every is not None and step % problem.check_every == 0
        per_module: torch.Tensor | None
        if problem.hand_written:
            with torch.no_grad():
                now = [
                    torch.mul(p, s, out=b)
                    for p, s, b in zip(params, scales, point_bufs, strict=True)
                ]
                per_module, raw = problem.loss_and_grads(now, with_loss=check)
                grads = [
                    torch.mul(g, s, out=b) for g, s, b in zip(raw, scales, grad_bufs, strict=True)
                ]
        else:
            per_module = problem.loss(current())
            # Modules are independent; summing keeps each module's gradient its own.
            grads = list(torch.autograd.grad(per_module.sum(), params))
        if check and per_module is not None:
            # The loss is evaluated at the current point: record it before stepping away.
            with torch.no_grad():
                keep_better(per_module.detach())
        # Cosine decay: large early steps leave the Frobenius optimum fast, small late steps
        # settle into the L1 optimum instead of rattling around it.
        adam.step(grads, cosine_lr(lr, step, steps))
    with torch.no_grad():
        if together is not None:
            together.release()
            point = current()
            start_tasks, last = together.errors([start, point])
            start_err, last_err = start_tasks.mean(1), last.mean(1)
            # As below: a NaN last iterate or a tie keeps the start.
            worse = (start_err <= last_err) | last_err.isnan()
            for kept, first_t in zip(point, start, strict=True):
                kept[worse] = first_t[worse]
            last[worse] = start_tasks[worse]
            together.chose(worse)
            return point, last
        last, exact = problem.finish(current())
        improved = keep_better(last.mean(1).to(best.err.dtype))
        point = best.tensors
        # Evaluated again unless the last iterate won everywhere on its float32 error (an earlier
        # one won somewhere, or the last was judged in low precision).
        last_won = exact and bool(improved.all())
        best_tasks = last if last_won else problem.error(point)
        if problem.best_from == "loop":
            worse = start_err <= best_tasks.mean(1)  # float32 comparison; ties keep the start
            for kept, first_t in zip(point, start, strict=True):
                kept[worse] = first_t[worse]
            best_tasks[worse] = start_tasks[worse]
    return point, best_tasks
