"""What a merge keeps and loses: hard-routed errors and trade-off plots.

The tasks' similarity per adapter kind lives with the kind (:mod:`hydraopt.kinds.lora.analysis`,
:mod:`hydraopt.kinds.vera.analysis`).

Everything here reads tensors the engine or io/ already produced; plots are PNG via matplotlib's
non-interactive backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydraopt.kinds.registry import KINDS
from hydraopt.merge import get_method, list_methods
from hydraopt.types import Bundle, VeraBundle


def error_by_task(bundle: Bundle | VeraBundle, key: str = "errors") -> dict[str, float]:
    """Mean hard-routed error per task over modules (as stored at merge time), either kind.

    ``key="zero_errors"`` gives the error of storing nothing (ΔW' = 0) instead.
    """
    errors: dict[str, list[float]] = bundle.extra.get(key, {})
    if not errors:
        return {}
    out = {}
    for i, task in enumerate(bundle.tasks):
        out[task] = sum(v[i] for v in errors.values()) / len(errors)
    return out


def mean_error(bundle: Bundle | VeraBundle, key: str = "errors") -> float:
    """Mean hard-routed error over tasks and modules."""
    per_task = error_by_task(bundle, key)
    return sum(per_task.values()) / max(1, len(per_task))


def relative_error(bundle: Bundle | VeraBundle) -> float:
    """Mean error divided by the error of storing nothing: 0 = exact, 1 = as bad as ΔW' = 0."""
    zero = mean_error(bundle, "zero_errors")
    return mean_error(bundle) / zero if zero > 0 else 0.0


# Plot series of plot_tradeoff: (name in the legend, marker, colour), by a point's "method".
# "heads": methods that take M (the registry's ``takes_heads``), joined M = 1..K by a line.
SERIES = {
    "heads": ("HydraOpt, M = 1..K (shared A', M heads)", "o", "tab:red"),
    "a_only": ("A-only merges (merged A, every task's B)", "^", "tab:green"),
    "classic": ("classic merges (one merged adapter)", "s", "tab:blue"),
    "separate": ("separate adapters", "D", "tab:purple"),
    "zero-shot": ("zero-shot (base model)", "x", "black"),
}
JOINED_SERIES = ("heads",)  # drawn as a line through M = 1..K, not as separate points
# A joined series whose points name several curves (bit widths, budget mode) gets a line per curve,
# told apart by these styles in turn: one line through all of them zigzags between widths.
CURVE_STYLES = ("-", "--", ":", "-.")


def series_of(method: str | None) -> str:
    """The :data:`SERIES` key of a point's method: a registry name, an adapter kind's name (the
    separate adapters) or ``zero-shot``.

    Registered methods are told apart by what the registry says of them: ``takes_heads``, or the
    ``<name>_a_only`` variants of the classic merges (every task keeps its own B).
    """
    if method == "zero-shot":
        return method
    if method in KINDS:
        return "separate"
    if method in list_methods() and get_method(method).takes_heads:
        return "heads"
    if method is not None and method.endswith("_a_only"):
        return "a_only"
    return "classic"


def _curve_order(curve: str | None) -> tuple[int, str]:
    """Curves by width, widest first (``"16-bit"``, ``"8-bit"``, ``"4-bit"``), then the rest."""
    head = (curve or "").split("-bit")[0].split("/")[0]
    return (-int(head), "") if head.isdigit() else (0, curve or "")


def place_labels(
    ax: Any, anchors: Sequence[tuple[str, float, float]], fontsize: float = 7
) -> list[Any]:
    """Annotate each ``(text, x, y)`` so that no two labels overlap.

    Labels go right of their point; one that would overlap a label already placed (or the
    legend, or the title) moves up, then down, a line at a time, with a thin leader line to its
    point. Points are visited left to right, top to bottom.

    Returns:
        The annotations, in the order placed.
    """
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    step = fontsize * 1.3  # points per text line
    placed: list[Any] = []
    legend = ax.get_legend()
    boxes: list[Any] = [] if legend is None else [legend.get_window_extent(renderer)]
    if ax.get_title():  # crowded points push labels above the axes, into the title
        boxes.append(ax.title.get_window_extent(renderer))
    for text, x, y in sorted(anchors, key=lambda a: (a[1], -a[2])):
        for k in range(60):
            shift = 0 if k == 0 else (-1) ** k * ((k + 1) // 2) * step  # 0, +1, -1, +2, -2 lines
            label = ax.annotate(
                text,
                (x, y),
                fontsize=fontsize,
                xytext=(4, 3 - shift),
                textcoords="offset points",
                arrowprops=None if k == 0 else {"arrowstyle": "-", "lw": 0.4, "color": "grey"},
            )
            # the text alone: an Annotation's own extent also covers its leader line
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)
            if not any(box.overlaps(other) for other in boxes) or k == 59:
                break
            label.remove()
        placed.append(label)
        boxes.append(box)
    return placed


def pareto_front(
    points: Sequence[dict[str, Any]], x_key: str, y_key: str, *, higher: bool = True
) -> list[dict[str, Any]]:
    """The points no other point dominates, sorted by ``x_key``: a point is dominated when another
    has no more ``x_key`` (storage, bytes) and a ``y_key`` no worse, better in one of the two.

    ``higher`` says which way ``y_key`` is better: True for task scores, False for errors. Points
    that tie on both keys keep each other on the front.
    """
    sign = 1.0 if higher else -1.0

    def dominates(o: dict[str, Any], p: dict[str, Any]) -> bool:
        x_o, x_p, y_o, y_p = o[x_key], p[x_key], sign * o[y_key], sign * p[y_key]
        return x_o <= x_p and y_o >= y_p and (x_o < x_p or y_o > y_p)

    front = [p for p in points if not any(dominates(o, p) for o in points)]
    return sorted(front, key=lambda p: (p[x_key], -sign * p[y_key]))


def plot_tradeoff(
    points: Sequence[dict[str, Any]],
    path: Path,
    *,
    y_key: str,
    y_label: str,
    title: str,
    reference: tuple[float, str] | None = None,
    front: bool = False,
) -> Path:
    """Storage % (x) against ``y_key`` with one labelled point per system; HydraOpt M=1..K joined.

    Every series (:data:`SERIES`) and the ``reference`` line are named in the legend, and no two
    point labels overlap (:func:`place_labels`). Points of a joined series that carry different
    ``"curve"`` names (``"16-bit"``, ``"4-bit"``, ``"budget mode"``) are joined per curve.

    ``reference`` draws a dashed horizontal line (value, label), e.g. the error of storing nothing.
    ``front`` draws the Pareto front of higher ``y_key`` (:func:`pareto_front`) as a dotted line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, (name, marker, color) in SERIES.items():
        group = sorted(
            (p for p in points if series_of(p.get("method")) == key),
            key=lambda p: p["storage_percent"],
        )
        if not group:
            continue
        xs, ys = [p["storage_percent"] for p in group], [p[y_key] for p in group]
        curves = list(dict.fromkeys(p.get("curve") for p in group))  # first-seen order
        if key in JOINED_SERIES and len(curves) > 1:
            for i, curve in enumerate(sorted(curves, key=_curve_order)):
                line = [p for p in group if p.get("curve") == curve]
                ax.plot(
                    [p["storage_percent"] for p in line],
                    [p[y_key] for p in line],
                    CURVE_STYLES[i % len(CURVE_STYLES)],
                    marker=marker,
                    color=color,
                    alpha=1.0 - 0.2 * min(i, 3),
                    label=f"{name}: {curve}",
                )
        elif key in JOINED_SERIES:
            ax.plot(xs, ys, "-", marker=marker, color=color, label=name)
        else:
            ax.scatter(xs, ys, marker=marker, color=color, label=name)
    if front:
        best = pareto_front(points, "storage_percent", y_key)
        ax.plot(
            [p["storage_percent"] for p in best],
            [p[y_key] for p in best],
            ":",
            color="black",
            linewidth=1,
            label="Pareto front",
        )
    if reference is not None:
        ax.axhline(reference[0], color="grey", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xlabel("storage S (% of the separate adapters)")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # Outside the axes: inside, "best" placement still covered point labels.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.canvas.draw()  # fixes the axis limits before labels are measured against each other
    place_labels(ax, [(p["label"], p["storage_percent"], p[y_key]) for p in points])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
