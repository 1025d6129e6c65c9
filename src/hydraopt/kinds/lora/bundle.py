"""LoRA bundles on disk (format version 1; 3 when quantized) and their PEFT export.

Tensors are keyed ``<module>.A`` (r, k) and ``<module>.heads`` (M, d, r), heads with the LoRA
scale folded in; ``bundle.json`` adds the routing and each task's original scales. Export writes
one standard PEFT LoRA dir per task: the task's *original* ``adapter_config.json`` and A' with
the task's routed head divided by that task's original scale for the module — PEFT multiplies it
back, so ΔW = B' A' exactly as in the bundle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.adapter_dir import write_task_adapters
from hydraopt.io.container import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TENSORS_NAME,
    bundle_fields,
    provenance_meta,
    read_bundle_quantized,
    write_bundle_dir,
)
from hydraopt.io.dtypes import DTYPES
from hydraopt.io.keys import lora_key
from hydraopt.quantize import QuantizedTensor
from hydraopt.results import MergedModule
from hydraopt.types import Bundle, ModuleSpec


def save_lora_bundle(
    bundle: Bundle, out: str | Path, *, dtype: str = "float16", force: bool = False
) -> Path:
    """Write a LoRA ``bundle`` to the directory ``out`` atomically (see module doc)."""
    tensors = lora_bundle_tensors(bundle, dtype)
    routing = {
        spec.name: [int(x) for x in bundle.merged[spec.name].routing] for spec in bundle.modules
    }
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **provenance_meta(bundle, dtype),
        "modules": [
            {
                "name": m.name,
                "d": m.d,
                "k": m.k,
                "r": m.r,
                "heads": bundle.merged[m.name].num_heads,
            }
            for m in bundle.modules
        ],
        "routing": routing,
        "storage": bundle.storage.to_dict(),
        "scales": bundle.scales,
        "adapter_configs": bundle.adapter_configs,
        "extra": bundle.provenance.to_dict(),
    }
    return write_bundle_dir(out, tensors, meta, force=force, quantized=bundle.quantized)


def lora_bundle_tensors(bundle: Bundle, dtype: str) -> dict[str, torch.Tensor]:
    """The bundle's tensors by name as a 16-bit (or float32) bundle stores them, in ``dtype``."""
    if dtype not in DTYPES:
        raise HydraoptError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensors: dict[str, torch.Tensor] = {}
    for spec in bundle.modules:
        module = bundle.merged[spec.name]
        tensors[f"{spec.name}.A"] = module.A.to(DTYPES[dtype]).contiguous()
        tensors[f"{spec.name}.heads"] = module.heads.to(DTYPES[dtype]).contiguous()
    return tensors


def with_lora_tensors(
    bundle: Bundle, tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor]
) -> Bundle:
    """``bundle`` with its factors read from ``tensors`` (float32) and ``quantized`` attached."""
    merged = {
        name: MergedModule(
            tensors[f"{name}.A"].float(), tensors[f"{name}.heads"].float(), module.routing
        )
        for name, module in bundle.merged.items()
    }
    return dataclasses.replace(bundle, merged=merged, quantized=dict(quantized))


def load_lora_bundle_from_meta(path: Path, meta: dict[str, Any]) -> Bundle:
    """The LoRA bundle in ``path`` whose ``bundle.json`` (already checked) is ``meta``."""
    tensor_path = path / TENSORS_NAME
    tensors, quantized = read_bundle_quantized(path, meta)
    modules, merged = [], {}
    for m in meta["modules"]:
        spec = ModuleSpec(name=m["name"], d=m["d"], k=m["k"], r=m["r"])
        modules.append(spec)
        try:
            a = tensors[f"{spec.name}.A"].float()
            heads = tensors[f"{spec.name}.heads"].float()
        except KeyError as e:
            raise HydraoptError(f"{tensor_path}: missing tensor {e}") from e
        routing = torch.tensor(meta["routing"][spec.name], dtype=torch.long)
        merged[spec.name] = MergedModule(a, heads, routing)
    return Bundle(
        **bundle_fields(meta, modules, merged), scales=meta["scales"], quantized=quantized
    )


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


def export_lora_adapters(
    bundle: Bundle,
    out: str | Path,
    *,
    tasks: list[str] | None = None,
    force: bool = False,
    dtype: str | None = None,
) -> dict[str, Path]:
    """Write ``out/<task>/`` PEFT LoRA adapter dirs (atomically, all or nothing).

    Args:
        bundle: a loaded or in-memory LoRA bundle.
        out: parent directory to create; refused if it exists unless ``force``.
        tasks: subset of tasks to export (default all).
        force: replace an existing ``out``.
        dtype: tensor dtype of the files; default the bundle's storage dtype when it was loaded
            from disk, float32 for an in-memory bundle (nothing rounded that was not already).
    """
    return write_task_adapters(
        bundle, out, lambda task, dt: peft_state_dict(bundle, task, dt), {}, tasks, force, dtype
    )
