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
                ax.text(
                    j,
                    i,
                    f"{float(rel[i, j]):.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w",
                )
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle("relative difference between tasks' LoRA factors (0 = identical)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


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

    ``reference`` draws a dashed horizontal line (value, label), e.g. the error of storing nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = sorted(
        (p for p in points if p.get("method") == "hydraopt"), key=lambda p: p["storage_percent"]
    )
    if curve:
        ax.plot(
            [p["storage_percent"] for p in curve],
            [p[y_key] for p in curve],
            "-o",
            color="tab:red",
            label="hydraopt (M = 1..K)",
        )
    others = [p for p in points if p.get("method") != "hydraopt"]
    for p in others:
        ax.scatter(p["storage_percent"], p[y_key], marker="s", color="tab:blue")
    for p in points:
        ax.annotate(
            p["label"],
            (p["storage_percent"], p[y_key]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    if reference is not None:
        ax.axhline(reference[0], color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            reference[1],
            (ax.get_xlim()[0], reference[0]),
            fontsize=7,
            color="grey",
            xytext=(2, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("storage S (% of the separate adapters)")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curve:
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
