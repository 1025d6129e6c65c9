"""Fixtures of the runtime tests: a tiny chat model, real PEFT adapters on it, merged bundles."""

from __future__ import annotations

from pathlib import Path

import pytest
from unit.runtime.tiny_chat import build_adapter, build_tiny_chat_model

TASKS = ("t0", "t1", "t2")

# name -> (adapter kind, method, options); every bundle kind the project writes, M = 1, 2, K.
BUNDLES = {
    "hydraopt-m2": ("lora", "hydraopt", {"heads": 2, "refine_steps": 3}),
    "hydraopt-m3": ("lora", "hydraopt", {"heads": 3, "refine_steps": 0}),
    "ties-m1": ("lora", "ties", {}),
    "ties-a-only-mk": ("lora", "ties_a_only", {}),
    "vera-hydraopt-m2": ("vera", "hydraopt", {"heads": 2, "refine_steps": 3}),
    "vera-ties-m1": ("vera", "ties", {}),
}


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("chat-base"))


@pytest.fixture(scope="session")
def chat_adapters(chat_base, tmp_path_factory) -> dict[str, list[Path]]:
    """kind -> one PEFT adapter dir per task."""
    root = tmp_path_factory.mktemp("chat-adapters")
    return {
        kind: [
            build_adapter(chat_base, root / kind / t, kind=kind, seed=i)
            for i, t in enumerate(TASKS)
        ]
        for kind in ("lora", "vera")
    }


@pytest.fixture(scope="session")
def chat_bundle(chat_adapters, tmp_path_factory):
    """Bundle name -> (bundle dir saved in float16, its PEFT export dir)."""
    import hydraopt

    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            kind, method, options = BUNDLES[name]
            aset = hydraopt.load_adapter_set(chat_adapters[kind])
            bundle = hydraopt.merge_adapter_set(aset, method, options)
            root = tmp_path_factory.mktemp(name)
            hydraopt.save_bundle(bundle, root / "bundle")
            loaded = hydraopt.load_any_bundle(root / "bundle")
            hydraopt.export_peft_adapters(loaded, root / "export")
            cache[name] = (root / "bundle", root / "export")
        return cache[name]

    return get
