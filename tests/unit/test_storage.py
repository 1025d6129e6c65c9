"""Parameter and byte accounting against counts worked out by hand, and against the bytes of
the tensors a real merge stores."""

from __future__ import annotations

import pytest

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.kinds.registry import get_kind
from hydraopt.storage import (
    adapters_params,
    bundle_params,
    quantized_storage_report,
    records_storage_report,
    storage_report,
    vera_storage_report,
)
from hydraopt.types import ModuleSpec

Q = ModuleSpec(name="q", d=4, k=6, r=2)
V = ModuleSpec(name="v", d=3, k=6, r=2)


def test_lora_counts_by_hand():
    # K = 3 adapters: 3 * 2 * (4 + 6) + 3 * 2 * (3 + 6) = 60 + 54.
    assert adapters_params([Q, V], 3) == 114
    # One A' (r k = 12) per module, M d r per module's heads: (2 * 8 + 12) + (1 * 6 + 12).
    assert bundle_params([Q, V], {"q": 2, "v": 1}) == 46
    report = storage_report([Q, V], 3, {"q": 2, "v": 1}, bytes_per_param=2)
    assert (report.adapters_params, report.bundle_params) == (114, 46)
    assert (report.adapters_bytes, report.bundle_bytes) == (228, 92)
    assert report.storage_percent == pytest.approx(100 * 46 / 114)
    assert report.saved_percent == pytest.approx(100 - 100 * 46 / 114)
    assert report.routing_entries == 6 and report.projection_params is None


def test_m_equals_k_stores_more_than_the_adapters_only_by_the_shared_a():
    # M = K heads: K d r + r k per module against K r (d + k): one A' instead of K A's.
    report = storage_report([Q], 3, {"q": 3})
    assert report.bundle_params == 3 * 4 * 2 + 2 * 6
    assert report.adapters_params - report.bundle_params == 2 * 2 * 6


def test_records_report_equals_the_heads_report_for_the_same_count():
    assert records_storage_report([Q, V], 3, 46, 4) == storage_report(
        [Q, V], 3, {"q": 2, "v": 1}, bytes_per_param=4
    )


def test_quantized_report_is_a_ratio_of_bytes_against_16_bit_adapters():
    report = quantized_storage_report(storage_report([Q, V], 3, {"q": 2, "v": 1}), 30)
    assert (report.adapters_bytes, report.bundle_bytes, report.bytes_per_param) == (228, 30, 2)
    assert report.storage_percent == pytest.approx(100 * 30 / 228)
    assert report.bundle_params == 46  # parameters stay as counted


def test_vera_counts_by_hand():
    big = ModuleSpec(name="q", d=4, k=6, r=8)
    # K = 3 VeRAs: 3 * (d + r) = 36; a bundle with 2 λb rows and 1 λd row: 2 * 4 + 8.
    report = vera_storage_report([big], 3, {"q": 2}, {"q": 1}, projection_params=8 * (6 + 4))
    assert (report.adapters_params, report.bundle_params) == (36, 16)
    assert report.projection_params == 80  # reported, counted on neither side
    assert report.routing_entries == 3


def test_bundle_bytes_equal_the_bytes_of_the_stored_tensors(make_adapter):
    paths = [make_adapter(f"t{i}", seed=i + 1) for i in range(3)]
    aset = load_adapter_set(paths)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 0})
    tensors = get_kind("lora").bundle_tensors(bundle, "float16")
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert bundle.storage.bundle_bytes == stored
    adapters = sum(3 * m.r * (m.d + m.k) for m in aset.modules) * 2
    assert bundle.storage.adapters_bytes == adapters
