"""Save and load bundles of any adapter kind: the container (:mod:`hydraopt.io.container`)
plus the kind's tensors (:mod:`hydraopt.kinds`).

LoRA bundles are format version 1; VeRA bundles are version 2 with ``adapter_kind: "vera"``
(docs/bundle-format.md). The container's names are re-exported here, and LoRA's typed reader
(:func:`hydraopt.kinds.lora.bundle.load_lora_bundle`) as ``load_bundle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydraopt.io.container import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_NAME,
    NEWEST_FORMAT_VERSION,
    TENSORS_NAME,
    read_bundle_meta,
)
from hydraopt.io.dtypes import DTYPES
from hydraopt.kinds.lora.bundle import load_lora_bundle as load_bundle
from hydraopt.kinds.names import LEGACY_BUNDLE_KIND
from hydraopt.kinds.registry import get_kind

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_NAME",
    "NEWEST_FORMAT_VERSION",
    "TENSORS_NAME",
    "load_any_bundle",
    "load_bundle",
    "save_bundle",
]


def save_bundle(
    bundle: Any, out: str | Path, *, dtype: str = "float16", force: bool = False
) -> Path:
    """Write ``bundle`` (LoRA or VeRA) to the directory ``out`` atomically.

    Args:
        bundle: the merged result.
        out: target directory; refused if it exists unless ``force``.
        dtype: tensor storage type, ``float16`` (default, like PEFT's saved adapters),
            ``bfloat16`` or ``float32``.
        force: replace an existing ``out``.
    """
    return get_kind(bundle.kind).save_bundle(bundle, out, dtype=dtype, force=force)


def load_any_bundle(path: str | Path) -> Any:
    """Read a LoRA or a VeRA bundle directory (tensors as float32)."""
    meta = read_bundle_meta(path)
    return get_kind(meta.get("adapter_kind", LEGACY_BUNDLE_KIND)).load_bundle(Path(path), meta)
