"""Small hand-built bundles on disk (no adapters, no merge) for tests that corrupt them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hydraopt.io.bundle import META_NAME, TENSORS_NAME, save_bundle
from hydraopt.results import MergedModule, MergedVeraModule, Provenance, StorageReport
from hydraopt.types import Bundle, ModuleSpec, VeraBundle

TASKS = ("alpha", "beta", "gamma")
STORAGE = {
    "adapters_params": 100,
    "bundle_params": 50,
    "storage_percent": 50.0,
    "saved_percent": 50.0,
    "bytes_per_param": 4,
    "adapters_bytes": 400,
    "bundle_bytes": 200,
    "routing_entries": 6,
}
MODULES = (ModuleSpec("layers.0.q", d=4, k=3, r=2), ModuleSpec("layers.0.k", d=2, k=3, r=2))


def lora_bundle(heads: int = 2) -> Bundle:
    """K = 3 tasks, two modules, ``heads`` heads; routing (0, 1, 1) or all zeros."""
    gen = torch.Generator().manual_seed(0)
    route = torch.tensor([0, 1, 1] if heads > 1 else [0, 0, 0])
    merged = {
        m.name: MergedModule(
            torch.randn(m.r, m.k, generator=gen),
            torch.randn(heads, m.d, m.r, generator=gen),
            route,
        )
        for m in MODULES
    }
    return Bundle(
        method="hydraopt",
        config={"heads": heads},
        tasks=TASKS,
        base_model="tiny",
        modules=MODULES,
        merged=merged,
        adapter_configs={t: {"peft_type": "LORA", "r": 2, "lora_alpha": 4} for t in TASKS},
        scales={t: {m.name: 2.0 for m in MODULES} for t in TASKS},
        storage=StorageReport.from_dict(STORAGE),
        provenance=Provenance(library_version="test"),
    )


def vera_bundle(heads: int = 2) -> VeraBundle:
    """K = 3 VeRA tasks, λd shared (one row), λb with ``heads`` rows; projections r = 2."""
    gen = torch.Generator().manual_seed(1)
    route = torch.tensor([0, 1, 1] if heads > 1 else [0, 0, 0])
    merged = {
        m.name: MergedVeraModule(
            torch.randn(heads, m.d, generator=gen), torch.randn(1, m.r, generator=gen), route
        )
        for m in MODULES
    }
    return VeraBundle(
        method="hydraopt",
        config={"heads": heads},
        tasks=TASKS,
        base_model="tiny",
        modules=MODULES,
        merged=merged,
        projections=(torch.randn(2, 3, generator=gen), torch.randn(4, 2, generator=gen)),
        adapter_configs={t: {"peft_type": "VERA", "r": 2} for t in TASKS},
        storage=StorageReport.from_dict(STORAGE),
        provenance=Provenance(library_version="test"),
    )


def write(bundle: Bundle | VeraBundle, out: Path) -> Path:
    return save_bundle(bundle, out, dtype="float32")


def edit_meta(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite ``bundle.json`` through ``change`` (which edits the dict in place)."""
    meta = json.loads((path / META_NAME).read_text())
    change(meta)
    (path / META_NAME).write_text(json.dumps(meta))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite ``tensors.safetensors`` through ``change`` (which edits the dict in place)."""
    tensors = load_file(str(path / TENSORS_NAME))
    change(tensors)
    save_file(tensors, str(path / TENSORS_NAME), metadata={"format": "pt"})
