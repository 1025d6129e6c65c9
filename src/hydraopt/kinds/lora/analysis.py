"""How alike K LoRA adapters' factors are: the paper's Fig. 2 (A's alike, B's not)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from hydraopt.kinds.lora.load import AdapterSet
from hydraopt.types import ModuleSpec


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
