"""VeRA adapters have no separate factor pairs to store in bytes (``separate_factors``): the byte
budget, the separate-quantized baselines and the sweep's separate points refuse or skip them,
while LoRA adapters of the same shapes get them."""

from __future__ import annotations

import pytest

from hydraopt.budget_merge import budget_bytes
from hydraopt.errors import HydraoptError
from hydraopt.io.peft import load_adapter_set
from hydraopt.kinds.registry import get_kind
from hydraopt.quantized_bundle import separate_point
from hydraopt.sweep import separate_points


@pytest.fixture
def vera_set(make_vera_adapter):
    return load_adapter_set([make_vera_adapter(f"t{i}", seed=i) for i in range(3)])


def test_the_kinds_say_which_has_separate_factors() -> None:
    assert get_kind("lora").separate_factors and not get_kind("vera").separate_factors


def test_vera_sets_get_no_byte_yardstick(vera_set) -> None:
    assert vera_set.kind == "vera"
    with pytest.raises(HydraoptError, match="is for LoRA adapters"):
        budget_bytes(vera_set, 20.0)
    with pytest.raises(ValueError, match="not vera"):
        separate_point(vera_set, 4)
    assert separate_points(vera_set, [16, 8, 4], 32, "mae") == []


def test_lora_sets_get_it(make_adapter) -> None:
    lora = load_adapter_set([make_adapter(f"t{i}", seed=i) for i in range(3)])
    assert budget_bytes(lora, 50.0) > 0
    assert [p["bits"] for p in separate_points(lora, [16, 8, 4], 32, "mae")] == [8, 4]
