"""Spend a byte budget across modules: one option per module (e.g. a head count M and a bit
width), minimising the summed error — a multiple-choice knapsack, solved by the greedy on each
module's lower convex hull.

Each module starts at its cheapest option; the greedy repeatedly takes, over all modules, the
next hull step with the largest error decrease per byte that still fits. Every point it passes
through is optimal for its own byte total (it solves the Lagrangian relaxation), so with a budget
that lands on such a point the choice is exact; in between, a last pass takes any single further
upgrade (on or off the hull) that fits and lowers the error most. The budget is never exceeded.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One way to store a module.

    Attributes:
        nbytes: exact stored bytes.
        error: the error it leaves (any additive measure, e.g. summed hard-routed MAE).
        label: what the option is (for reports), e.g. "M=2 4-bit".
    """

    nbytes: int
    error: float
    label: str = ""


@dataclass(frozen=True)
class Allocation:
    """The chosen option per module.

    Attributes:
        choice: index into each module's options.
        nbytes: total bytes of the choice.
        error: total error of the choice.
    """

    choice: tuple[int, ...]
    nbytes: int
    error: float


def allocate(options: Sequence[Sequence[Option]], budget: int) -> Allocation:
    """Choose one option per module, total bytes <= ``budget``, total error as low as found.

    Args:
        options: per module, its options (any order, at least one).
        budget: byte budget.

    Raises:
        ValueError: a module without options, or a budget below the cheapest choice.
    """
    if any(len(opts) == 0 for opts in options):
        raise ValueError("every module needs at least one storage option")
    hulls = [_lower_hull(opts) for opts in options]
    position = [0] * len(options)  # index into each hull
    spent = sum(opts[h[0]].nbytes for opts, h in zip(options, hulls, strict=True))
    if spent > budget:
        raise ValueError(
            f"budget {budget} bytes is below the smallest possible size ({spent} bytes)"
        )
    heap: list[tuple[float, int]] = []
    for m in range(len(options)):
        _push_next(heap, options, hulls, position, m)
    while heap:
        _, m = heapq.heappop(heap)
        opts, hull = options[m], hulls[m]
        step = opts[hull[position[m] + 1]].nbytes - opts[hull[position[m]]].nbytes
        if spent + step > budget:
            continue  # this module's next step does not fit; later, cheaper steps of others may
        spent += step
        position[m] += 1
        _push_next(heap, options, hulls, position, m)
    choice = [hull[p] for hull, p in zip(hulls, position, strict=True)]
    _best_single_upgrade(options, choice, budget - spent)
    total_bytes = sum(opts[c].nbytes for opts, c in zip(options, choice, strict=True))
    total_error = sum(opts[c].error for opts, c in zip(options, choice, strict=True))
    return Allocation(tuple(choice), total_bytes, total_error)


def _lower_hull(opts: Sequence[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (bytes, error), by increasing bytes.

    Dominated options (more bytes, no less error) drop out first.
    """
    order = sorted(range(len(opts)), key=lambda i: (opts[i].nbytes, opts[i].error))
    frontier: list[int] = []
    for i in order:
        if frontier and opts[i].error >= opts[frontier[-1]].error:
            continue  # dominated: costs at least as much and is no better
        if frontier and opts[i].nbytes == opts[frontier[-1]].nbytes:
            frontier.pop()
        frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2 and _slope(opts, hull[-2], hull[-1]) <= _slope(opts, hull[-1], i):
            hull.pop()  # hull[-1] lies on or above the chord: never the best step
        hull.append(i)
    return hull


def _slope(opts: Sequence[Option], i: int, j: int) -> float:
    """Error decrease per byte from option i to option j (positive: j is better)."""
    return (opts[i].error - opts[j].error) / (opts[j].nbytes - opts[i].nbytes)


def _push_next(
    heap: list[tuple[float, int]],
    options: Sequence[Sequence[Option]],
    hulls: list[list[int]],
    position: list[int],
    m: int,
) -> None:
    hull = hulls[m]
    if position[m] + 1 < len(hull):
        gain = _slope(options[m], hull[position[m]], hull[position[m] + 1])
        heapq.heappush(heap, (-gain, m))


def _best_single_upgrade(options: Sequence[Sequence[Option]], choice: list[int], left: int) -> None:
    """Take the one further option change (any module, any option) that fits and helps most."""
    best: tuple[float, int, int] | None = None
    for m, opts in enumerate(options):
        now = opts[choice[m]]
        for i, opt in enumerate(opts):
            extra = opt.nbytes - now.nbytes
            gain = now.error - opt.error
            if extra <= left and gain > 0 and (best is None or gain > best[0]):
                best = (gain, m, i)
    if best is not None:
        choice[best[1]] = best[2]


def allocate_for_error(options: Sequence[Sequence[Option]], max_error: float) -> Allocation:
    """The dual of :func:`allocate`: few bytes with total error <= ``max_error``.

    Walks the same greedy path (each module's lower hull, steps by error decrease per byte) from
    the cheapest choice and stops at the first point whose total error is within ``max_error``;
    every point of that path is the least error for its byte total, so no choice with fewer
    bytes than the point before it reaches ``max_error``.

    Raises:
        ValueError: a module without options, or ``max_error`` below the least total error.
    """
    if any(len(opts) == 0 for opts in options):
        raise ValueError("every module needs at least one storage option")
    hulls = [_lower_hull(opts) for opts in options]
    position = [0] * len(options)
    error = sum(opts[h[0]].error for opts, h in zip(options, hulls, strict=True))
    least = sum(opts[h[-1]].error for opts, h in zip(options, hulls, strict=True))
    if least > max_error:
        raise ValueError(f"max error {max_error:g} is below the least reachable ({least:g})")
    heap: list[tuple[float, int]] = []
    for m in range(len(options)):
        _push_next(heap, options, hulls, position, m)
    while error > max_error and heap:
        _, m = heapq.heappop(heap)
        opts, hull = options[m], hulls[m]
        error += opts[hull[position[m] + 1]].error - opts[hull[position[m]]].error
        position[m] += 1
        _push_next(heap, options, hulls, position, m)
    choice = tuple(hull[p] for hull, p in zip(hulls, position, strict=True))
    total_bytes = sum(opts[c].nbytes for opts, c in zip(options, choice, strict=True))
    total_error = sum(opts[c].error for opts, c in zip(options, choice, strict=True))
    return Allocation(choice, total_bytes, total_error)
