"""Export a bundle as one standard PEFT adapter dir per task, of the bundle's adapter kind.

A LoRA bundle gives PEFT LoRA dirs (:func:`hydraopt.kinds.lora.bundle.export_lora_adapters`), a
VeRA bundle PEFT VeRA dirs (:func:`hydraopt.kinds.vera.bundle.export_vera_adapters`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydraopt.kinds.registry import get_kind


def export_peft_adapters(
    bundle: Any,
    out: str | Path,
    *,
    tasks: list[str] | None = None,
    force: bool = False,
    dtype: str | None = None,
) -> dict[str, Path]:
    """Write ``out/<task>/`` PEFT adapter dirs (atomically, all or nothing).

    Args:
        bundle: a loaded or in-memory bundle (a VeRA bundle gives PEFT VeRA dirs).
        out: parent directory to create; refused if it exists unless ``force``.
        tasks: subset of tasks to export (default all).
        force: replace an existing ``out``.
        dtype: tensor dtype of the files; default the bundle's storage dtype when it was loaded
            from disk, float32 for an in-memory bundle (nothing rounded that was not already).

    Returns:
        task -> adapter directory.
    """
    return get_kind(bundle.kind).export_adapters(bundle, out, tasks=tasks, force=force, dtype=dtype)
