"""LoRA bundles on disk (format version 1; 3 when quantized) and their PEFT export.

Tensors are keyed ``<module>.A`` (r, k) and ``<module>.heads`` (M, d, r), heads with the LoRA
scale folded in (a ``shared_basis`` bundle, ``tensor_layout: "shared_basis"``, keeps
``<module>.U`` (d, R), ``.V`` (k, R) and ``.cores`` instead: the record type names them); ``bundle.json`` adds the routing and each task's original scales. Export writes
one standard PEFT LoRA dir per task: the task's *original* ``adapter_config.json`` and A' with
the task's routed head divided by that task's original scale for the module — PEFT multiplies it
back, so ΔW = B' A' exactly as in the bundle.
"""

from __future__ import annotations

import dataclasses
import re
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
    read_bundle_meta,
    read_bundle_quantized,
    write_bundle_dir,
)
from hydraopt.io.dtypes import DTYPES
from hydraopt.io.keys import lora_key
from hydraopt.kinds.lora.check_bundle import check_lora_bundle
from hydraopt.kinds.lora.traits import LORA_TRAITS
from hydraopt.quantize import QuantizedTensor
from hydraopt.results import LORA_LAYOUTS, LoraRecord, MergedModule
from hydraopt.types import Bundle, ModuleSpec


def save_lora_bundle(
    bundle: Bundle, out: str | Path, *, dtype: str = "float16", force: bool = False
) -> Path:
    """Write a LoRA ``bundle`` to the directory ``out`` atomically (see module doc)."""
    layout = tensor_layout(bundle)
    tensors = lora_bundle_tensors(bundle, dtype)
    routing = {
        spec.name: [int(x) for x in bundle.merged[spec.name].routing] for spec in bundle.modules
    }
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        # Written only for a layout other than the default, so factor bundles stay unchanged.
        **({} if layout == MergedModule.layout else {"tensor_layout": layout}),
        **provenance_meta(bundle, dtype),
        "modules": [
            {"name": m.name, "d": m.d, "k": m.k, "r": m.r, **bundle.merged[m.name].module_meta()}
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
        # The record names its tensors: <m>.A / <m>.heads, or <m>.U / <m>.V / <m>.cores.
        for suffix, t in bundle.merged[spec.name].bundle_tensors().items():
            tensors[f"{spec.name}.{suffix}"] = t.to(DTYPES[dtype]).contiguous()
    return tensors


def with_lora_tensors(
    bundle: Bundle, tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor]
) -> Bundle:
    """``bundle`` with its factors read from ``tensors`` (float32) and ``quantized`` attached."""
    merged: dict[str, LoraRecord] = {}
    for spec in bundle.modules:
        module = bundle.merged[spec.name]
        own = {s: tensors[f"{spec.name}.{s}"].float() for s in module.bundle_tensors()}
        meta = {"name": spec.name, "d": spec.d, "k": spec.k, "r": spec.r, **module.module_meta()}
        merged[spec.name] = type(module).from_tensors(own, meta, module.routing)
    return dataclasses.replace(bundle, merged=merged, quantized=dict(quantized))


def load_lora_bundle(path: str | Path) -> Bundle:
    """Read a LoRA bundle directory written by :func:`save_lora_bundle` (tensors as float32);
    ``hydraopt.load_bundle``.

    Raises:
        HydraoptError: for anything but a readable LoRA bundle (a VeRA bundle included: read
            those with :func:`hydraopt.io.bundle.load_any_bundle`).
    """
    meta = read_bundle_meta(path)
    kind = meta.get("adapter_kind", LORA_TRAITS.name)  # version 1 bundles have no field: LoRA
    if kind != LORA_TRAITS.name:
        raise HydraoptError(
            f"{path}: a {kind.upper()} bundle has no LoRA factors; read it with "
            "hydraopt.load_any_bundle or export it (hydraopt export) to PEFT adapter dirs"
        )
    return load_lora_bundle_from_meta(Path(path), meta)


def load_lora_bundle_from_meta(path: Path, meta: dict[str, Any]) -> Bundle:
    """The LoRA bundle in ``path`` whose ``bundle.json`` (already checked) is ``meta``."""
    tensor_path = path / TENSORS_NAME
    tensors, quantized = read_bundle_quantized(path, meta, check_lora_bundle)
    record = LORA_LAYOUTS[meta.get("tensor_layout", MergedModule.layout)]  # checked on read
    modules: list[ModuleSpec] = []
    merged: dict[str, LoraRecord] = {}
    for m in meta["modules"]:
        spec = ModuleSpec(name=m["name"], d=m["d"], k=m["k"], r=m["r"])
        modules.append(spec)
        try:
            own = {
                suffix: tensors[f"{spec.name}.{suffix}"].float()
                for suffix in record.tensor_shapes(m, len(meta["tasks"]))
            }
        except KeyError as e:
            raise HydraoptError(f"{tensor_path}: missing tensor {e}") from e
        routing = torch.tensor(meta["routing"][spec.name], dtype=torch.long)
        merged[spec.name] = record.from_tensors(own, m, routing)
    return Bundle(
        **bundle_fields(meta, modules, merged), scales=meta["scales"], quantized=quantized
    )


def peft_state_dict(bundle: Bundle, task: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The PEFT-format tensors of one task's adapter."""
    if task not in bundle.tasks:
        raise HydraoptError(f"task {task!r} is not in the bundle (tasks: {list(bundle.tasks)})")
    out = {}
    for name, (a, head) in bundle.task_factors(task).items():
        scale = bundle.merged[name].peft_scale(bundle.scales[task][name])
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
        bundle,
        out,
        lambda task, dt: peft_state_dict(bundle, task, dt),
        peft_config_overrides(bundle),
        tasks,
        force,
        dtype,
    )


def tensor_layout(bundle: Bundle) -> str:
    """The one tensor layout of the bundle's records (``factors`` or ``shared_basis``)."""
    layouts = {type(m).layout for m in bundle.merged.values()}
    if len(layouts) != 1:
        raise HydraoptError(f"a bundle holds one tensor layout, found {sorted(layouts)}")
    return layouts.pop()


def peft_config_overrides(bundle: Bundle) -> dict[str, Any]:
    """adapter_config.json entries an export sets on top of each task's original config.

    Factor bundles: none (same rank r, the original scale restores ΔW). Shared-basis bundles
    have a rank R per module: PEFT's ``rank_pattern`` gives each module its R and
    ``alpha_pattern`` lora_alpha = R, so PEFT's scale alpha / r is exactly 1 in every module
    (rsLoRA off: PEFT warns on patterns with it) and B = U S_i is written undivided. Pattern
    keys are regexes PEFT matches at the end of the module path (``(.*\\.)?(key)$``), so the
    names are escaped to match only themselves.
    """
    if tensor_layout(bundle) == MergedModule.layout:
        return {}
    ranks = {m.name: int(bundle.merged[m.name].A.shape[0]) for m in bundle.modules}
    default = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common R
    return {
        "r": default,
        "lora_alpha": default,
        "use_rslora": False,
        "rank_pattern": {re.escape(n): R for n, R in ranks.items() if default != R},
        "alpha_pattern": {re.escape(n): R for n, R in ranks.items() if default != R},
    }
