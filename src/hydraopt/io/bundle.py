"""The bundle on disk: ``bundle.json`` (metadata) + ``tensors.safetensors`` (A' and heads).

Versioned; documented in docs/bundle-format.md. Tensors are keyed ``<module>.A`` (r, k) and
``<module>.heads`` (M, d, r), heads with the LoRA scale folded in. Writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hydraopt.errors import HydraoptError
from hydraopt.io.atomic import atomic_dir
from hydraopt.types import Bundle, ModuleSpec

FORMAT_NAME = "hydraopt-bundle"
FORMAT_VERSION = 1
META_NAME = "bundle.json"
TENSORS_NAME = "tensors.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_bundle(
    bundle: Bundle, out: str | Path, *, dtype: str = "float16", force: bool = False
) -> Path:
    """Write ``bundle`` to the directory ``out`` atomically.

    Args:
        bundle: the merged result.
        out: target directory; refused if it exists unless ``force``.
        dtype: tensor storage type, ``float16`` (default, like PEFT's saved adapters),
            ``bfloat16`` or ``float32``.
        force: replace an existing ``out``.
    """
    if dtype not in DTYPES:
        raise HydraoptError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensors: dict[str, torch.Tensor] = {}
    routing: dict[str, list[int]] = {}
    for spec in bundle.modules:
        a, heads, route = bundle.merged[spec.name]
        tensors[f"{spec.name}.A"] = a.to(DTYPES[dtype]).contiguous()
        tensors[f"{spec.name}.heads"] = heads.to(DTYPES[dtype]).contiguous()
        routing[spec.name] = [int(x) for x in route]
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": bundle.extra.get("library_version"),
        "method": bundle.method,
        "config": bundle.config,
        "tasks": list(bundle.tasks),
        "base_model": bundle.base_model,
        "dtype": dtype,
        "modules": [
            {
                "name": m.name,
                "d": m.d,
                "k": m.k,
                "r": m.r,
                "heads": int(bundle.merged[m.name][1].shape[0]),
            }
            for m in bundle.modules
        ],
        "routing": routing,
        "storage": bundle.storage,
        "scales": bundle.scales,
        "adapter_configs": bundle.adapter_configs,
        "extra": bundle.extra,
    }
    with atomic_dir(Path(out), force=force) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return Path(out)


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle directory written by :func:`save_bundle` (tensors as float32)."""
    path = Path(path)
    meta_path, tensor_path = path / META_NAME, path / TENSORS_NAME
    if not meta_path.is_file() or not tensor_path.is_file():
        raise HydraoptError(f"{path}: not a hydraopt bundle (needs {META_NAME} and {TENSORS_NAME})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise HydraoptError(f"{meta_path}: corrupt bundle metadata ({e})") from e
    if meta.get("format") != FORMAT_NAME:
        raise HydraoptError(f"{meta_path}: not a hydraopt bundle (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise HydraoptError(
            f"{path}: bundle format {meta['format_version']} is newer than this hydraopt "
            f"({FORMAT_VERSION}); upgrade hydraopt"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise HydraoptError(f"{tensor_path}: corrupt tensor file ({e})") from e
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
        merged[spec.name] = (a, heads, routing)
    return Bundle(
        method=meta["method"],
        config=meta["config"],
        tasks=tuple(meta["tasks"]),
        base_model=meta["base_model"],
        modules=tuple(modules),
        merged=merged,
        adapter_configs=meta["adapter_configs"],
        scales=meta["scales"],
        storage=meta["storage"],
        extra={**meta.get("extra", {}), "dtype": meta.get("dtype")},
    )
