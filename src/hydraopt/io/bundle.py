"""Save and load bundles of any adapter kind: the container (:mod:`hydraopt.io.container`)
plus the kind's tensors (:mod:`hydraopt.kinds`).

LoRA bundles are format version 1; VeRA bundles are version 2 with ``adapter_kind: "vera"``
(docs/bundle-format.md). The container's names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydraopt.errors import HydraoptError
from hydraopt.io.container import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_NAME,
    NEWEST_FORMAT_VERSION,
    TENSORS_NAME,
    read_bundle_meta,
)
from hydraopt.io.dtypes import DTYPES
from hydraopt.kinds.registry import get_kind
from hydraopt.types import Bundle

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
    return get_kind(meta.get("adapter_kind", "lora")).load_bundle(Path(path), meta)


def load_bundle(path: str | Path) -> Bundle:
    """Read a LoRA bundle directory written by :func:`save_bundle` (tensors as float32).

    Raises:
        HydraoptError: for anything but a readable LoRA bundle (a VeRA bundle included: read
            those with :func:`load_any_bundle`).
    """
    meta = read_bundle_meta(path)
    kind = meta.get("adapter_kind", "lora")
    if kind != "lora":
        raise HydraoptError(
            f"{path}: a {kind.upper()} bundle has no LoRA factors; read it with "
            "hydraopt.load_any_bundle or export it (hydraopt export) to PEFT adapter dirs"
        )
    return get_kind("lora").load_bundle(Path(path), meta)
