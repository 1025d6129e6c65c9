"""Terminal output: progress and summary tables."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from hydraopt.progress import Progress

if TYPE_CHECKING:
    import torch

# Away from a terminal rich assumes 80 columns and wraps table titles mid phrase; a log has no
# width, so give it room (a table still takes only the width it needs).
console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "module"):
    """Progress on stderr (a bar on a terminal, a plain line every 30 s in a log); yields a
    callable(n) to advance it."""
    with Progress(total, desc, unit) as progress:
        yield progress.update


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    # The title on its own line: as a rich table title it wraps at the table's width.
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    table = Table()
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


def print_similarity_tables(
    sim: dict[str, torch.Tensor], keys: tuple[str, ...], tasks: list[str], num_modules: int
) -> None:
    """One task x task table per factor: its relative mean absolute difference (0 = identical)."""
    for key in keys:
        print_table(
            f"mean |{key}_i - {key}_j| / mean |{key}| over {num_modules} modules (0 = identical)",
            ["", *tasks],
            [[t, *[float(v) for v in sim[f"{key}_relative"][i]]] for i, t in enumerate(tasks)],
        )
