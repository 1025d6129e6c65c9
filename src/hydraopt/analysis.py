"""What a merge keeps and loses: factor similarity, hard-routed errors, trade-off plots.

Everything here reads tensors the engine or io/ already produced; plots are PNG via matplotlib's
non-interactive backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hydraopt.io.peft import AdapterSet
from hydraopt.types import Bundle, ModuleSpec, VeraBundle


def factor_similarity(
    aset: AdapterSet, modules: Sequence[ModuleSpec] | None = None
) -> dict[str, torch.Tensor]:
    """How alike the tasks' A's are, and their B's (the paper's Fig. 2).

    Args:
        aset: the adapters.
        modules: which modules to average over (default all).

    Returns:
        ``{"A", "B"}``: (K, K) mean over modules of mean |X_i - X_j| (the paper's measure), and
        ``{"A_relative", "B_relative"}``: the same divided by the mean |X| of the pair. Only the
        relative numbers compare A with B (A's start from a kaiming init and are ~10x larger
        than B's); small relative A distances next to large B ones are what HydraOpt exploits.
    """
    specs = list(modules) if modules is not None else list(aset.modules)
    K = len(aset.tasks)
    keys = ("A", "B", "A_relative", "B_relative")
    sums = {k: torch.zeros(K, K, dtype=torch.float64) for k in keys}
    for spec in specs:
        stack = aset.load_stack([spec])
        for key, t in (("A", stack.A[0]), ("B", stack.B[0])):
            flat = t.flatten(1).to(torch.float64)  # (K, n)
            diff = (flat[:, None, :] - flat[None, :, :]).abs().mean(-1)  # (K, K)
            size = flat.abs().mean(-1)  # (K,)
            sums[key] += diff
            sums[f"{key}_relative"] += diff / ((size[:, None] + size[None, :]) / 2).clamp_min(1e-30)
    return {k: v / max(1, len(specs)) for k, v in sums.items()}


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


def text_color(rgba: Sequence[float]) -> str:
    """``"black"`` or ``"white"``, whichever reads better on a cell of colour ``rgba``.

    By the cell's relative luminance (WCAG: sRGB linearised, 0.2126 R + 0.7152 G + 0.0722 B);
    above 0.179 black text has the higher contrast ratio, below it white.
    """

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def plot_similarity(sim: dict[str, torch.Tensor], tasks: Sequence[str], path: Path) -> Path:
    """Two heatmaps (A and B) of pairwise mean absolute differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    vmax = float(max(sim["A_relative"].max(), sim["B_relative"].max()))
    for ax, key in zip(axes, ("A", "B"), strict=True):
        rel = sim[f"{key}_relative"]
        im = ax.imshow(rel.numpy(), vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(f"mean |{key}_i - {key}_j| / mean |{key}|")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                value = float(rel[i, j])
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=text_color(im.cmap(im.norm(value))),
                )
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle("relative difference between tasks' LoRA factors (0 = identical)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# Plot series of plot_tradeoff: (name in the legend, marker, colour), by a point's "method".
SERIES = {
    "hydraopt": ("HydraOpt, M = 1..K (shared A', M heads)", "o", "tab:red"),
    "a_only": ("A-only merges (merged A, every task's B)", "^", "tab:green"),
    "classic": ("classic merges (one merged adapter)", "s", "tab:blue"),
    "separate": ("separate adapters", "D", "tab:purple"),
    "zero-shot": ("zero-shot (base model)", "x", "black"),
}


def series_of(method: str | None) -> str:
    """The :data:`SERIES` key of a point's method (registry name, ``lora``, ``zero-shot``...)."""
    if method in ("hydraopt", "zero-shot"):
        return method
    if method in ("lora", "vera"):
        return "separate"
    if method is not None and method.endswith("_a_only"):
        return "a_only"
    return "classic"


def place_labels(
    ax: Any, anchors: Sequence[tuple[str, float, float]], fontsize: float = 7
) -> list[Any]:
    """Annotate each ``(text, x, y)`` so that no two labels overlap.

    Labels go right of their point; one that would overlap a label already placed (or the
    legend) moves up, then down, a line at a time, with a thin leader line to its point. Points
    are visited left to right, top to bottom.

    Returns:
        The annotations, in the order placed.
    """
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    step = fontsize * 1.3  # points per text line
    placed: list[Any] = []
    legend = ax.get_legend()
    boxes: list[Any] = [] if legend is None else [legend.get_window_extent(renderer)]
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


def plot_tradeoff(
    points: Sequence[dict[str, Any]],
    path: Path,
    *,
    y_key: str,
    y_label: str,
    title: str,
    reference: tuple[float, str] | None = None,
) -> Path:
    """Storage % (x) against ``y_key`` with one labelled point per system; HydraOpt M=1..K joined.

    Every series (:data:`SERIES`) and the ``reference`` line are named in the legend, and no two
    point labels overlap (:func:`place_labels`).

    ``reference`` draws a dashed horizontal line (value, label), e.g. the error of storing nothing.
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
        if key == "hydraopt":
            ax.plot(xs, ys, "-", marker=marker, color=color, label=name)
        else:
            ax.scatter(xs, ys, marker=marker, color=color, label=name)
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
