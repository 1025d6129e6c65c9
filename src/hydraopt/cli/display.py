"""Terminal output: progress bars and summary tables."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

console = Console(stderr=False)


@contextmanager
def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr; yields a callable(n) to advance it.

    Off when stderr is not a terminal (CI logs, pipes): hundreds of carriage-return updates
    there are noise, and the summary table says what happened.
    """
    bar = tqdm(
        total=total,
        desc=desc,
        unit="module",
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        disable=None,
    )
    try:
        yield bar.update
    finally:
        bar.close()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    console.print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
        return f"{v:.3e}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
