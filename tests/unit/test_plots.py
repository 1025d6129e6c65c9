"""Plots: legible labels and colours, every series named (checked on the figure's own artists)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from hydraopt.analysis import (  # noqa: E402
    SERIES,
    pareto_front,
    place_labels,
    plot_tradeoff,
    series_of,
)
from hydraopt.kinds.lora.analysis import text_color  # noqa: E402


def test_text_color_follows_the_cell_luminance() -> None:
    viridis = plt.get_cmap("viridis")
    assert text_color(viridis(0.0)) == "white"  # dark purple
    assert text_color(viridis(1.0)) == "black"  # yellow: white text was hard to read there
    assert text_color((1.0, 1.0, 1.0, 1.0)) == "black"
    assert text_color((0.0, 0.0, 0.0, 1.0)) == "white"
    assert text_color((0.0, 0.0, 1.0, 1.0)) == "white"  # pure blue is dark (luminance 0.07)


def test_labels_of_equal_points_do_not_overlap() -> None:
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter([0, 1], [0, 1])
    ax.legend(["points"], loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.canvas.draw()
    anchors = [(f"method_{i}_a_only", 0.5, 0.5) for i in range(6)] + [("alone", 0.0, 0.0)]
    labels = place_labels(ax, anchors)
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(label, renderer) for label in labels]
    boxes.append(ax.get_legend().get_window_extent(renderer))
    assert sorted(label.get_text() for label in labels) == sorted(a[0] for a in anchors)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    plt.close(fig)


def test_the_legend_names_every_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    points = [
        {"label": f"hydraopt M={m}", "method": "hydraopt", "storage_percent": 12 + 8 * m}
        for m in (1, 2)
    ]
    points += [
        {"label": "ties", "method": "ties", "storage_percent": 20.0},
        {"label": "ties_a_only", "method": "ties_a_only", "storage_percent": 28.0},
        {"label": "LoRA", "method": "lora", "storage_percent": 100.0},
        {"label": "zero-shot", "method": "zero-shot", "storage_percent": 0.0},
    ]
    for i, p in enumerate(points):
        p["y"] = float(i)
    plot_tradeoff(
        points, tmp_path / "t.png", y_key="y", y_label="y", title="t", reference=(1.0, "nothing")
    )
    legend = [t.get_text() for t in saved[0].axes[0].get_legend().get_texts()]
    assert legend == [name for name, _, _ in SERIES.values()] + ["nothing"]
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_series_of() -> None:
    assert [series_of(m) for m in ("hydraopt", "dare_ties", "dare_ties_a_only", "vera")] == [
        "heads",
        "classic",
        "a_only",
        "separate",
    ]


def test_series_of_reads_the_registry(monkeypatch) -> None:
    """A method that takes M joins the joined series by what the registry says, not its name."""
    from hydraopt.merge import registry

    class TakesHeads:
        takes_heads = True

    class FixesHeads:
        takes_heads = False

    monkeypatch.setitem(registry._METHODS, "test_heads_method", TakesHeads())
    monkeypatch.setitem(registry._METHODS, "test_fixed_method", FixesHeads())
    assert series_of("test_heads_method") == "heads"
    assert series_of("test_fixed_method") == "classic"


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [
        {"label": "a", "storage_percent": 0.0, "y": 18.0},
        {"label": "b", "storage_percent": 5.0, "y": 34.5},
        {"label": "c", "storage_percent": 10.0, "y": 34.2},  # beaten by b: fewer bytes, higher
        {"label": "d", "storage_percent": 13.8, "y": 46.6},
        {"label": "e", "storage_percent": 13.8, "y": 46.0},  # same bytes as d, lower
        {"label": "f", "storage_percent": 100.0, "y": 46.6},  # ties d's score with more bytes
        {"label": "g", "storage_percent": 26.6, "y": 46.9},
    ]
    assert [p["label"] for p in pareto_front(points, "storage_percent", "y")] == [
        "a",
        "b",
        "d",
        "g",
    ]


def test_mark_pareto_keeps_the_fewest_bytes_for_each_error() -> None:
    """Lower error is better here: the same dominance test as the score front, turned over."""
    from hydraopt.sweep import mark_pareto

    points = [
        {"label": "a", "bytes": 100, "error": 0.5},
        {"label": "b", "bytes": 200, "error": 0.5},  # same error as a with more bytes
        {"label": "c", "bytes": 200, "error": 0.2},
        {"label": "d", "bytes": 300, "error": 0.3},  # beaten by c on both
        {"label": "e", "bytes": 300, "error": 0.1},
        {"label": "f", "bytes": 300, "error": 0.1},  # ties e on both: both stay
    ]
    mark_pareto(points)
    assert [p["label"] for p in points if p["pareto"]] == ["a", "c", "e", "f"]


def test_a_joined_series_draws_one_line_per_curve(tmp_path: Path, monkeypatch) -> None:
    """HydraOpt at 16 and 4 bits: two lines, each through its own M = 1..3, not one zigzag."""
    saved: list[Figure] = []
    original = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1]
    )
    points = [
        {
            "label": f"M={m} {bits}",
            "method": "hydraopt",
            "curve": f"{bits}-bit",
            "storage_percent": (12 + 8 * m) * bits / 16,
            "y": 30.0 + m,
        }
        for bits in (4, 16)
        for m in (1, 2, 3)
    ]
    points.append({"label": "LoRA", "method": "lora", "storage_percent": 100.0, "y": 40.0})
    plot_tradeoff(points, tmp_path / "t.png", y_key="y", y_label="y", title="t", front=True)
    ax = saved[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    name = SERIES["heads"][0]
    assert list(lines) == [f"{name}: 16-bit", f"{name}: 4-bit", "Pareto front"]
    assert list(lines[f"{name}: 16-bit"].get_xdata()) == [20.0, 28.0, 36.0]
    assert list(lines[f"{name}: 4-bit"].get_xdata()) == [5.0, 7.0, 9.0]
    # The front: the 4-bit line (each point the best at its size), then LoRA above them all.
    assert list(lines["Pareto front"].get_xdata()) == [5.0, 7.0, 9.0, 100.0]
