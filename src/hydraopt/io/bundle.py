"""The bundle on disk: ``bundle.json`` (metadata) + ``tensors.safetensors`` (A' and heads).

Versioned; documented in docs/bundle-format.md. Tensors are keyed ``<module>.A`` (r, k) and
``<module>.heads`` (M, d, r), heads with the LoRA scale folded in. Writes are atomic. VeRA bundles
(format version 2, ``adapter_kind: "vera"``) live in :mod:`hydraopt.vera.bundle`; ``save_bundle``
and ``load_any_bundle`` handle both kinds.
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
from hydraopt.io.check_bundle import check_bundle, check_bundle_header
from hydraopt.types import Bundle, ModuleSpec, VeraBundle

FORMAT_NAME = "hydraopt-bundle"
FORMAT_VERSION = 1  # what LoRA bundles are written as (unchanged since version 1)
NEWEST_FORMAT_VERSION = 2  # version 2 adds ``adapter_kind`` (VeRA bundles); readers take both
META_NAME = "bundle.json"
TENSORS_NAME = "tensors.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_bundle(
    bundle: Bundle | VeraBundle, out: str | Path, *, dtype: str = "float16", force: bool = False
) -> Path:
    """Write ``bundle`` to the directory ``out`` atomically.

    Args:
        bundle: the merged result (a VeRA bundle is written by
            :func:`hydraopt.vera.bundle.save_vera_bundle`).
        out: target directory; refused if it exists unless ``force``.
        dtype: tensor storage type, ``float16`` (default, like PEFT's saved adapters),
            ``bfloat16`` or ``float32``.
        force: replace an existing ``out``.
    """
    if not isinstance(bundle, Bundle):
        from hydraopt.vera.bundle import save_vera_bundle  # it imports this module

        return save_vera_bundle(bundle, out, dtype=dtype, force=force)
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
        **provenance_meta(bundle, dtype),
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
    return write_bundle_dir(out, tensors, meta, force=force)


def provenance_meta(bundle: Bundle | VeraBundle, dtype: str) -> dict[str, Any]:
    """The ``bundle.json`` fields every bundle kind writes alike, in the format's key order."""
    return {
        "library_version": bundle.extra.get("library_version"),
        "method": bundle.method,
        "config": bundle.config,
        "tasks": list(bundle.tasks),
        "base_model": bundle.base_model,
        "dtype": dtype,
    }


def write_bundle_dir(
    out: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, force: bool
) -> Path:
    """Write ``tensors.safetensors`` and ``bundle.json`` into the directory ``out`` atomically."""
    with atomic_dir(Path(out), force=force) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def read_bundle_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the bundle dir ``path`` (as stored)."""
    tensor_path = path / TENSORS_NAME
    try:
        return load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise HydraoptError(f"{tensor_path}: corrupt tensor file ({e})") from e


def bundle_fields(
    meta: dict[str, Any], modules: list[ModuleSpec], merged: dict[str, Any]
) -> dict[str, Any]:
    """The constructor arguments every bundle kind reads alike from its ``bundle.json``."""
    return {
        "method": meta["method"],
        "config": meta["config"],
        "tasks": tuple(meta["tasks"]),
        "base_model": meta["base_model"],
        "modules": tuple(modules),
        "merged": merged,
        "adapter_configs": meta["adapter_configs"],
        "storage": meta["storage"],
        "extra": {**meta.get("extra", {}), "dtype": meta.get("dtype")},
    }


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    """The checked ``bundle.json`` of a bundle dir (format name and version)."""
    path = Path(path)
    meta_path, tensor_path = path / META_NAME, path / TENSORS_NAME
    if not meta_path.is_file() or not tensor_path.is_file():
        raise HydraoptError(f"{path}: not a hydraopt bundle (needs {META_NAME} and {TENSORS_NAME})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as e:
        raise HydraoptError(f"{meta_path}: corrupt bundle metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise HydraoptError(f"{meta_path}: not a hydraopt bundle (format={found!r})")
    check_bundle_header(meta, meta_path)
    if int(meta.get("format_version", 0)) > NEWEST_FORMAT_VERSION:
        raise HydraoptError(
            f"{path}: bundle format {meta['format_version']} is newer than this hydraopt "
            f"({NEWEST_FORMAT_VERSION}); upgrade hydraopt"
        )
    return meta


def load_any_bundle(path: str | Path) -> Bundle | VeraBundle:
    """Read a LoRA or a VeRA bundle directory (tensors as float32)."""
    meta = read_bundle_meta(path)
    if meta.get("adapter_kind", "lora") == "vera":
        from hydraopt.vera.bundle import load_vera_bundle_from_meta  # it imports this module

        return load_vera_bundle_from_meta(Path(path), meta)
    return load_bundle(path)


def load_bundle(path: str | Path) -> Bundle:
    """Read a LoRA bundle directory written by :func:`save_bundle` (tensors as float32).

    Raises:
        HydraoptError: for anything but a readable LoRA bundle (a VeRA bundle included: read
            those with :func:`load_any_bundle`).
    """
    path = Path(path)
    tensor_path = path / TENSORS_NAME
    meta = read_bundle_meta(path)
    kind = meta.get("adapter_kind", "lora")
    if kind != "lora":
        raise HydraoptError(
            f"{path}: a {kind.upper()} bundle has no LoRA factors; read it with "
            "hydraopt.load_any_bundle or export it (hydraopt export) to PEFT adapter dirs"
        )
    tensors = read_bundle_tensors(path)
    check_bundle(meta, tensors, path)
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
    return Bundle(**bundle_fields(meta, modules, merged), scales=meta["scales"])
