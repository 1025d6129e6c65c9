"""The report of an evaluation: Table 1 as markdown, the results JSON and the trade-off plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydraopt.analysis import plot_tradeoff
from hydraopt.eval.results import EvalResults

# Secondary scores shown beside a task's primary one but left out of Avg: the paper reports
# grammar correction as F0.5 and also gives JFLEG's own GLEU.
EXTRA_COLUMNS = {"gleu": "GLEU"}


def _number(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def markdown_table(results: EvalResults) -> str:
    """Table 1 of the paper: one row per system with S %, a column per task, then Avg.

    A task whose scores carry an :data:`EXTRA_COLUMNS` key (GLEU for grammar correction) gets a
    second column beside it, left out of Avg. Numbers have one decimal, as in the paper.
    """
    columns: list[tuple[str, str]] = []  # (task, score key)
    header = ["system", "S %"]
    for task in results.tasks:
        columns.append((task, "primary"))
        header.append(task)
        for key, name in EXTRA_COLUMNS.items():
            if any(key in s.tasks[task].scores for s in results.systems):
                columns.append((task, key))
                header.append(f"{task} {name}")
    header.append("Avg")
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for s in results.systems:
        cells = [s.label, _number(s.storage_percent)]
        cells += [_number(s.tasks[task].scores.get(key)) for task, key in columns]
        cells.append(_number(s.average))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Scores in 0..100 on the {results.config.split} split, greedy decoding. "
        "Avg: mean of the primary metrics"
        + (" (extra columns not included)." if len(columns) > len(results.tasks) else ".")
    )
    for task in results.tasks:
        first = results.systems[0].tasks[task] if results.systems else None
        if first is not None:
            lines.append(f"- {task}: {first.metric}; {first.examples} examples.")
    return "\n".join(lines) + "\n"


def curve_of(system: dict[str, Any]) -> str:
    """The plot curve of a system's description: ``"budget mode"`` for a budget-mode bundle (M and
    width per module), else its stored width(s), ``"16-bit"`` when nothing is quantized (a
    float32 bundle included: the curve only tells quantized rows from the rest)."""
    config = system.get("config") or {}
    if config.get("budget") is not None or config.get("max_error") is not None:
        return "budget mode"
    bits = system.get("bits") or []
    widths = [bits] if isinstance(bits, int) else list(bits)
    return f"{'/'.join(map(str, widths))}-bit" if widths else "16-bit"


def tradeoff_points(results: EvalResults) -> list[dict[str, Any]]:
    """One point per system for :func:`hydraopt.analysis.plot_tradeoff` (y key ``average``),
    with its curve (:func:`curve_of`), so HydraOpt at 16, 8 and 4 bits draw three lines."""
    return [
        {
            "label": s.label,
            "method": s.method,
            "storage_percent": s.storage_percent,
            "average": s.average,
            "curve": curve_of(s.system),
        }
        for s in results.systems
    ]


def write_report(results: EvalResults, out: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``.

    ``out`` may already exist (it usually holds the cache and merged bundles of earlier runs);
    the three files are replaced.

    Returns:
        ``{"json", "markdown", "plot"}`` -> path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "plot": out / "results.png",
    }
    _write_text(paths["json"], json.dumps(results.to_json(), indent=2, ensure_ascii=False) + "\n")
    _write_text(paths["markdown"], markdown_table(results))
    n = max((r.examples for s in results.systems for r in s.tasks.values()), default=0)
    plot_tradeoff(
        tradeoff_points(results),
        paths["plot"],
        y_key="average",
        y_label="average score over tasks (primary metrics, 0..100)",
        title=f"storage vs quality: {len(results.tasks)} tasks, {results.config.split} (≤{n} each)",
        front=True,
    )
    return paths


def _write_text(path: Path, text: str) -> None:
    # Write beside, then rename: a reader never sees half a results file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
