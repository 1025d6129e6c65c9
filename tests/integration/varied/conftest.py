"""Fixtures of the varied-adapter tests: a tiny chat model (tokenizer included, so the runtime
runs) and a factory of real PEFT adapters on it (tests/varied_adapters.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from unit.runtime.tiny_chat import build_tiny_chat_model
from varied_adapters import build_adapter


@pytest.fixture(scope="session")
def vbase(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("varied-base"))


@pytest.fixture
def adapters(vbase, tmp_path):
    """``adapters(spec, spec, ...)``: one PEFT adapter dir per LoraConfig spec (seed = index)."""

    def build(*specs: dict, parent: str = "in") -> list[Path]:
        out = []
        for i, spec in enumerate(specs):
            spec = dict(spec)
            name = spec.pop("name", f"t{i}")
            out.append(build_adapter(vbase, tmp_path / parent / name, seed=i, **spec))
        return out

    return build
