"""Unit tests of the per-task adapter systems and ``--system`` parsing, on small fake dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hydraopt.cli.evaluate import parse_system
from hydraopt.errors import HydraoptError
from hydraopt.eval.systems import (
    PerTaskLora,
    PerTaskVera,
    adapter_kind,
    file_sha256,
    text_sha256,
)


def fake_adapter(root: Path, task: str, peft_type: str, weights: bytes = b"w") -> Path:
    directory = root / task
    directory.mkdir(parents=True)
    config = {"peft_type": peft_type, "r": 4, "inference_mode": False}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def test_lora_cache_id_is_unchanged(tmp_path: Path) -> None:
    # The committed evaluation cache is keyed on this exact recipe; it must not move.
    directory = fake_adapter(tmp_path, "en-qa", "LORA")
    relevant = {"peft_type": "LORA", "r": 4}  # inference_mode left out
    expected = text_sha256(
        "lora",
        "en-qa",
        file_sha256(directory / "adapter_model.safetensors"),
        json.dumps(relevant, sort_keys=True),
    )
    system = PerTaskLora(root=tmp_path)
    assert system.cache_id("en-qa") == expected
    assert (system.kind, system.method, system.label, system.storage_percent) == (
        "lora",
        "lora",
        "LoRA",
        100.0,
    )


def test_vera_system_checks_kind_and_keys_its_cache_apart(tmp_path: Path) -> None:
    fake_adapter(tmp_path / "vera", "en-qa", "VERA")
    fake_adapter(tmp_path / "lora", "en-qa", "LORA")
    vera = PerTaskVera(root=tmp_path / "vera")
    vera.check_tasks(["en-qa"])
    assert (vera.kind, vera.method, vera.label, vera.storage_percent) == (
        "vera",
        "vera",
        "VeRA",
        100.0,
    )
    assert vera.describe()["kind"] == "vera"
    assert vera.adapter("en-qa") == tmp_path / "vera" / "en-qa"
    assert vera.cache_id("en-qa") != PerTaskLora(root=tmp_path / "lora").cache_id("en-qa")
    with pytest.raises(HydraoptError, match="is a lora adapter, not vera; pass its root as"):
        PerTaskVera(root=tmp_path / "lora").check_tasks(["en-qa"])
    with pytest.raises(HydraoptError, match="is a vera adapter, not lora"):
        PerTaskLora(root=tmp_path / "vera").check_tasks(["en-qa"])


def test_adapter_kind_refuses_other_peft_types(tmp_path: Path) -> None:
    assert adapter_kind(fake_adapter(tmp_path, "a", "VERA")) == "vera"
    with pytest.raises(HydraoptError, match="peft_type 'IA3' is not evaluated here"):
        adapter_kind(fake_adapter(tmp_path, "b", "IA3"))
    broken = tmp_path / "c"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(HydraoptError, match="cannot read"):
        adapter_kind(broken)


def test_parse_system_knows_vera(tmp_path: Path) -> None:
    system = parse_system(f"vera={tmp_path}")
    assert isinstance(system, PerTaskVera) and system.label == "VeRA" and system.root == tmp_path
    labelled = parse_system(f"vera={tmp_path}:VeRA r=256")
    assert isinstance(labelled, PerTaskVera) and labelled.label == "VeRA r=256"
    lora = parse_system(f"lora={tmp_path}")
    assert type(lora) is PerTaskLora and lora.label == "LoRA"
    with pytest.raises(HydraoptError, match="unknown kind 'dora'; use lora=ROOT, lora@8=ROOT"):
        parse_system(f"dora={tmp_path}")
    with pytest.raises(HydraoptError, match="is not a directory"):
        parse_system(f"vera={tmp_path / 'missing'}")
