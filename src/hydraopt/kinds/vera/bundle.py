"""VeRA bundles on disk (format version 2, ``adapter_kind: "vera"``) and their PEFT export.

Same directory layout as LoRA bundles (docs/bundle-format.md): ``bundle.json`` +
``tensors.safetensors``, written atomically. Tensors: ``<module>.lambda_b`` (Mb, d),
``<module>.lambda_d`` (Md, r) in the bundle dtype, and the shared projections ``vera_A``
(r, max_in), ``vera_B`` (max_out, r) always in float32: they must stay bit-equal to the ones the
original adapters were trained with. Export writes one PEFT VeRA dir per task with the task's
routed vectors and the projections (``save_projection: true``), so each dir is self-contained.
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
    bundle_fields,
    provenance_meta,
    read_bundle_quantized,
    write_bundle_dir,
)
from hydraopt.io.dtypes import DTYPES
from hydraopt.kinds.vera.check_bundle import check_vera_bundle
from hydraopt.kinds.vera.load import PROJECTION_KEYS, lambda_key
from hydraopt.quantize import QuantizedTensor
from hydraopt.results import MergedVeraModule
from hydraopt.types import ModuleSpec, VeraBundle

VERA_FORMAT_VERSION = 2


def save_vera_bundle(
    bundle: VeraBundle, out: str | Path, *, dtype: str = "float16", force: bool = False
) -> Path:
    """Write a VeRA ``bundle`` to the directory ``out`` atomically (see module doc)."""
    tensors = vera_bundle_tensors(bundle, dtype)
    vera_a, vera_b = bundle.projections
    routing: dict[str, list[int]] = {}
    modules = []
    for spec in bundle.modules:
        module = bundle.merged[spec.name]
        lam_b, lam_d, route = module.lambda_b, module.lambda_d, module.routing
        routing[spec.name] = [int(x) for x in route]
        rows_b, rows_d = int(lam_b.shape[0]), int(lam_d.shape[0])
        modules.append(
            {
                "name": spec.name,
                "d": spec.d,
                "k": spec.k,
                "r": spec.r,
                "heads": max(rows_b, rows_d),
                "lambda_b_rows": rows_b,
                "lambda_d_rows": rows_d,
            }
        )
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": VERA_FORMAT_VERSION,
        "adapter_kind": "vera",
        **provenance_meta(bundle, dtype),
        "projections": {
            "vera_A": list(vera_a.shape),
            "vera_B": list(vera_b.shape),
            "dtype": "float32",
        },
        "modules": modules,
        "routing": routing,
        "storage": bundle.storage.to_dict(),
        "adapter_configs": bundle.adapter_configs,
        "extra": bundle.provenance.to_dict(),
    }
    return write_bundle_dir(out, tensors, meta, force=force, quantized=bundle.quantized)


VERA_FROZEN = ("vera_A", "vera_B")  # shared frozen projections: never quantized, not counted


def vera_bundle_tensors(bundle: VeraBundle, dtype: str) -> dict[str, torch.Tensor]:
    """The bundle's tensors by name as a 16-bit (or float32) bundle stores them."""
    if dtype not in DTYPES:
        raise HydraoptError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    vera_a, vera_b = bundle.projections
    tensors: dict[str, torch.Tensor] = {
        "vera_A": vera_a.to(torch.float32).contiguous(),
        "vera_B": vera_b.to(torch.float32).contiguous(),
    }
    for spec in bundle.modules:
        module = bundle.merged[spec.name]
        tensors[f"{spec.name}.lambda_b"] = module.lambda_b.to(DTYPES[dtype]).contiguous()
        tensors[f"{spec.name}.lambda_d"] = module.lambda_d.to(DTYPES[dtype]).contiguous()
    return tensors


def with_vera_tensors(
    bundle: VeraBundle, tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor]
) -> VeraBundle:
    """``bundle`` with its λ rows read from ``tensors`` (float32) and ``quantized`` attached."""
    merged = {
        name: MergedVeraModule(
            tensors[f"{name}.lambda_b"].float(), tensors[f"{name}.lambda_d"].float(), m.routing
        )
        for name, m in bundle.merged.items()
    }
    return dataclasses.replace(bundle, merged=merged, quantized=dict(quantized))


def load_vera_bundle_from_meta(path: Path, meta: dict[str, Any]) -> VeraBundle:
    """The VeRA bundle in ``path`` whose ``bundle.json`` (already checked) is ``meta``."""
    tensors, quantized = read_bundle_quantized(path, meta, check_vera_bundle)
    try:
        projections = (tensors["vera_A"].float(), tensors["vera_B"].float())
        modules, merged = [], {}
        for m in meta["modules"]:
            spec = ModuleSpec(name=m["name"], d=m["d"], k=m["k"], r=m["r"])
            modules.append(spec)
            routing = torch.tensor(meta["routing"][spec.name], dtype=torch.long)
            merged[spec.name] = MergedVeraModule(
                tensors[f"{spec.name}.lambda_b"].float(),
                tensors[f"{spec.name}.lambda_d"].float(),
                routing,
            )
    except KeyError as e:
        raise HydraoptError(f"{path}: incomplete VeRA bundle (missing {e})") from e
    return VeraBundle(
        **bundle_fields(meta, modules, merged), projections=projections, quantized=quantized
    )


def vera_state_dict(bundle: VeraBundle, task: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The PEFT-format tensors of one task's VeRA adapter (projections in float32)."""
    if task not in bundle.tasks:
        raise HydraoptError(f"task {task!r} is not in the bundle (tasks: {list(bundle.tasks)})")
    vera_a, vera_b = bundle.projections
    # PEFT copies saved projections into float32 buffers: rounding them would change every ΔW.
    out = {
        PROJECTION_KEYS["A"]: vera_a.to(torch.float32).contiguous(),
        PROJECTION_KEYS["B"]: vera_b.to(torch.float32).contiguous(),
    }
    for name, (lam_b, lam_d) in bundle.task_vectors(task).items():
        out[lambda_key(name, "b")] = lam_b.to(dtype).contiguous()
        out[lambda_key(name, "d")] = lam_d.to(dtype).contiguous()
    return out


def export_vera_adapters(
    bundle: VeraBundle,
    out: str | Path,
    *,
    tasks: list[str] | None = None,
    force: bool = False,
    dtype: str | None = None,
) -> dict[str, Path]:
    """Write ``out/<task>/`` PEFT VeRA adapter dirs (atomically, all or nothing).

    Each holds the task's original ``adapter_config.json`` with ``save_projection: true`` (the
    projections are in the file, so the dir loads anywhere, as PEFT recommends) and
    ``inference_mode: true``, plus ``hydraopt_export.json`` (provenance).

    Args:
        bundle: a loaded or in-memory VeRA bundle.
        out: parent directory to create; refused if it exists unless ``force``.
        tasks: subset of tasks to export (default all).
        force: replace an existing ``out``.
        dtype: dtype of the λ vectors; default the bundle's storage dtype when loaded from disk,
            float32 for an in-memory bundle.
    """
    return write_task_adapters(
        bundle,
        out,
        lambda task, dt: vera_state_dict(bundle, task, dt),
        {"save_projection": True},
        tasks,
        force,
        dtype,
    )
