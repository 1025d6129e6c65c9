"""Export a bundle as one standard PEFT LoRA adapter dir per task.

Each dir holds the task's *original* ``adapter_config.json`` and A' with the task's routed head.
Heads carry the LoRA scale, so each is divided by that task's original scale for the module:
PEFT multiplies it back, and ΔW = B' A' exactly as in the bundle. VeRA bundles export to PEFT
VeRA dirs (:func:`hydraopt.vera.bundle.export_vera_adapters`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hydraopt.errors import HydraoptError
from hydraopt.io.atomic import atomic_dir, mark_export
from hydraopt.io.bundle import DTYPES
from hydraopt.io.keys import lora_key
from hydraopt.io.names import select_tasks
from hydraopt.io.peft import CONFIG_NAME, SAFETENSORS_NAME
from hydraopt.types import Bundle, VeraBundle


def peft_state_dict(bundle: Bundle, task: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The PEFT-format tensors of one task's adapter."""
    if task not in bundle.tasks:
        raise HydraoptError(f"task {task!r} is not in the bundle (tasks: {list(bundle.tasks)})")
    out = {}
    for name, (a, head) in bundle.task_factors(task).items():
        scale = bundle.scales[task][name]
        out[lora_key(name, "A")] = a.to(dtype).contiguous()
        out[lora_key(name, "B")] = (head / scale).to(dtype).contiguous()
    return out


def export_peft_adapters(
    bundle: Bundle | VeraBundle,
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
    if isinstance(bundle, VeraBundle):
        from hydraopt.vera.bundle import export_vera_adapters  # it imports io/ modules

        return export_vera_adapters(bundle, out, tasks=tasks, force=force, dtype=dtype)
    return write_task_adapters(
        bundle, out, lambda task, dt: peft_state_dict(bundle, task, dt), {}, tasks, force, dtype
    )


def write_task_adapters(
    bundle: Bundle | VeraBundle,
    out: str | Path,
    state_dict: Callable[[str, torch.dtype], dict[str, torch.Tensor]],
    config_overrides: dict[str, Any],
    tasks: list[str] | None,
    force: bool,
    dtype: str | None,
) -> dict[str, Path]:
    """Write ``out/<task>/`` PEFT adapter dirs of either kind (atomically, all or nothing).

    Each holds ``state_dict(task, dtype)`` as ``adapter_model.safetensors``, the task's original
    ``adapter_config.json`` with ``inference_mode: true`` and ``config_overrides``, and
    ``hydraopt_export.json`` (provenance: method, config, the task's head per module).

    Args:
        bundle: the bundle the state dicts come from (for configs and provenance).
        out: parent directory to create; refused if it exists unless ``force``.
        state_dict: the PEFT-format tensors of one task in a torch dtype.
        config_overrides: config entries the export sets on top of the original config.
        tasks: subset of tasks to export (default all).
        force: replace an existing ``out``.
        dtype: dtype name of the files; default the bundle's storage dtype when it was loaded
            from disk, float32 for an in-memory bundle.
    """
    name = dtype or bundle.extra.get("dtype") or "float32"
    if name not in DTYPES:
        raise HydraoptError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    selected = select_tasks(bundle.tasks, tasks)
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        mark_export(tmp, selected)
        for task in selected:
            d = tmp / task
            d.mkdir()
            save_file(
                state_dict(task, DTYPES[name]),
                str(d / SAFETENSORS_NAME),
                metadata={"format": "pt"},
            )
            config = {**bundle.adapter_configs[task], "inference_mode": True, **config_overrides}
            (d / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            i = bundle.tasks.index(task)
            provenance = {
                "exported_by": f"hydraopt {bundle.extra.get('library_version')}",
                "method": bundle.method,
                "config": bundle.config,
                "task": task,
                "heads": {n: int(r[i]) for n, (_, _, r) in bundle.merged.items()},
            }
            (d / "hydraopt_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return {task: out / task for task in selected}
