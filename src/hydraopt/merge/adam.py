"""The refinements' optimiser: Adam in unit-RMS coordinates with a cosine learning-rate schedule.

Every refinement (HydraOpt's (A', heads), VeRA's vectors, the shared basis) optimises copies of
its factors divided by one RMS per module: Adam's steps are about lr in every coordinate, so one
*relative* learning rate then suits modules and factors of any magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def module_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of each module's slice of ``x`` (G, ...) -> (G,), floored away from 0."""
    return x.square().mean(dim=tuple(range(1, x.dim()))).sqrt().clamp_min(1e-30)


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
        # The denominator's buffer, reused by every step (fresh large tensors fault their pages
        # in anew each time; the same numbers).
        self.denom = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        bias1, bias2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        for p, g, m, v, d in zip(self.params, grads, self.m, self.v, self.denom, strict=True):
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = torch.sqrt(v, out=d).div_(math.sqrt(bias2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bias1)


class BestIterate:
    """The best point per module seen so far, by a loss (G,) evaluated at each offered point.

    Refinement keeps the best iterate per module rather than the last, so it can only improve on
    what it is compared with.

    Args:
        start: the tensors of the starting point, (G, ...) each; copied.
        err: (G,) the error to beat (``inf``: the first offer wins everywhere).
    """

    def __init__(self, start: list[torch.Tensor], err: torch.Tensor):
        self.tensors = [t.clone() for t in start]
        self.err = err

    def offer(self, err: torch.Tensor, point: Callable[[], list[torch.Tensor]]) -> torch.Tensor:
        """Keep ``point()`` where ``err`` (G,) beats the best so far; returns where (G,) bool.

        ``point`` is called only when some module improved (forming it costs a product).
        """
        better = err < self.err
        if bool(better.any()):
            self.err = torch.where(better, err, self.err)
            for best, now in zip(self.tensors, point(), strict=True):
                best[better] = now[better]
        return better
