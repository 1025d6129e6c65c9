"""The bundle container, whatever the adapter kind: ``bundle.json`` + ``tensors.safetensors``.

Versioned; documented in docs/bundle-format.md. This module knows the directory layout, the
format name and version checks and the metadata fields every kind writes alike; which tensors a
bundle holds is the kind's business (:mod:`hydraopt.kinds.lora.bundle`,
:mod:`hydraopt.kinds.vera.bundle`). Writes are atomic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hydraopt.errors import HydraoptError
from hydraopt.io.atomic import atomic_dir
from hydraopt.io.check_bundle import KindCheck, check_bundle, check_bundle_header
from hydraopt.io.quantized import QUANTIZED_FORMAT_VERSION, decode_quantized, encode_quantized
from hydraopt.quantize import QuantizedTensor
from hydraopt.results import Provenance, StorageReport
from hydraopt.types import ModuleSpec

FORMAT_NAME = "hydraopt-bundle"
FORMAT_VERSION = 1  # what LoRA bundles are written as (unchanged since version 1)
# Version 2 adds ``adapter_kind`` (VeRA bundles); version 3 quantized tensors (any kind, written
# only when a bundle holds some, so 16-bit bundles stay readable by older hydraopt).
NEWEST_FORMAT_VERSION = QUANTIZED_FORMAT_VERSION
META_NAME = "bundle.json"
TENSORS_NAME = "tensors.safetensors"


def provenance_meta(bundle: Any, dtype: str) -> dict[str, Any]:
    """The ``bundle.json`` fields every bundle kind writes alike, in the format's key order."""
    return {
        "library_version": bundle.provenance.library_version,
        "method": bundle.method,
        "config": bundle.config,
        "tasks": list(bundle.tasks),
        "base_model": bundle.base_model,
        "dtype": dtype,
    }


def write_bundle_dir(
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    force: bool,
    quantized: Mapping[str, QuantizedTensor] | None = None,
) -> Path:
    """Write ``tensors.safetensors`` and ``bundle.json`` into the directory ``out`` atomically.

    Args:
        tensors: the kind's tensors by name.
        meta: ``bundle.json``.
        force: replace an existing ``out``.
        quantized: name -> codes and scales of each tensor to store quantized (format version 3,
            :mod:`hydraopt.io.quantized`); none: the bundle is written exactly as given.
    """
    if quantized:
        tensors, table = encode_quantized(tensors, quantized, meta["dtype"])
        meta = {**meta, "format_version": QUANTIZED_FORMAT_VERSION, "quantization": table}
    with atomic_dir(Path(out), force=force) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def read_bundle_tensors(
    path: Path, meta: dict[str, Any], check_kind: KindCheck
) -> dict[str, torch.Tensor]:
    """Every tensor of the bundle dir ``path`` (quantized ones dequantized to float32)."""
    return read_bundle_quantized(path, meta, check_kind)[0]


def read_bundle_quantized(
    path: Path, meta: dict[str, Any], check_kind: KindCheck
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """The bundle's tensors by the kind's names, validated with its ``meta``, and the codes and
    scales of those stored quantized (empty for a 16-bit bundle).

    Bundles are files people share: the one validation layer (:func:`decode_quantized`, then
    :func:`check_bundle` on what it gives back, with the kind's ``check_kind``) runs here, for
    every kind, before any tensor is used. Plain tensors come as stored; quantized ones
    dequantized, in float32.
    """
    tensor_path = path / TENSORS_NAME
    try:
        stored = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise HydraoptError(f"{tensor_path}: corrupt tensor file ({e})") from e
    tensors, quantized = decode_quantized(stored, meta, path)
    check_bundle(meta, tensors, path, check_kind)
    return tensors, quantized


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
        "storage": StorageReport.from_dict(meta["storage"]),
        "provenance": Provenance.from_dict(meta.get("extra", {}), meta.get("dtype")),
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
