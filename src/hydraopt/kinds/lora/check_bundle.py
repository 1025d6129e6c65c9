"""LoRA's own checks of a bundle read from disk (:mod:`hydraopt.io.check_bundle` runs the
kind-independent ones first): the factor tensors each module's record names, and the per-task
scales export divides by."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.check_bundle import check_tensor, is_number, require_field
from hydraopt.results import LORA_LAYOUTS


def check_lora_bundle(
    meta: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tasks: list[str],
    modules: list[dict[str, Any]],
    where: Any,
) -> None:
    """``<m>.A`` (r, k), ``<m>.heads`` (heads, d, r) (or the shapes the bundle's
    ``tensor_layout`` names, see :data:`hydraopt.results.LORA_LAYOUTS`); a finite non-zero scale
    per task and module."""
    record = LORA_LAYOUTS.get(meta.get("tensor_layout", "factors"))
    if record is None:
        raise HydraoptError(
            f"{where}: tensor_layout must be one of {sorted(LORA_LAYOUTS)}, "
            f"got {meta.get('tensor_layout')!r}"
        )
    for m in modules:
        try:
            shapes = record.tensor_shapes(m, len(tasks))
        except HydraoptError as e:
            raise HydraoptError(f"{where}: {e}") from None
        for suffix, shape in shapes.items():
            check_tensor(tensors, f"{m['name']}.{suffix}", shape, where)
    scales = require_field(meta, "scales", dict, where)
    for task in tasks:
        per_module = scales.get(task)
        if not isinstance(per_module, dict):
            raise HydraoptError(f"{where}: scales has no object for task {task!r}")
        for m in modules:
            s = per_module.get(m["name"])
            if not is_number(s) or not math.isfinite(s) or s == 0:
                raise HydraoptError(
                    f"{where}: scale of task {task!r}, module {m['name']!r} must be a finite "
                    f"non-zero number, got {s!r}"
                )
