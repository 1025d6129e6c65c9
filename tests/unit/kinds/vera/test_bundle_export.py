"""VeRA bundles: bit-exact round trip, exact storage accounting, PEFT export loaded by PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from hydraopt.engine import merge_adapter_set
from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import load_any_bundle, load_bundle, save_bundle
from hydraopt.io.export import export_peft_adapters
from hydraopt.io.peft import load_adapter_set
from hydraopt.storage import vera_storage_report
from hydraopt.types import ModuleSpec, VeraBundle


@pytest.fixture
def vera_set(make_vera_adapter):
    return load_adapter_set([make_vera_adapter(f"t{i}", seed=i) for i in range(3)])


def routed_delta(bundle: VeraBundle, task: str, name: str) -> torch.Tensor:
    spec = next(m for m in bundle.modules if m.name == name)
    lam_b, lam_d = bundle.task_vectors(task)[name]
    vera_a, vera_b = bundle.projections
    return (lam_b[:, None] * vera_b[: spec.d]) @ (lam_d[:, None] * vera_a[:, : spec.k])


@pytest.mark.parametrize("method", ["hydraopt", "ties"])
def test_round_trip_is_bit_exact_in_float32(vera_set, tmp_path, method):
    options = {"heads": 2, "refine_steps": 5} if method == "hydraopt" else {}
    bundle = merge_adapter_set(vera_set, method, options)
    assert isinstance(bundle, VeraBundle)
    save_bundle(bundle, tmp_path / "b", dtype="float32")
    back = load_any_bundle(tmp_path / "b")
    assert isinstance(back, VeraBundle)
    assert back.tasks == bundle.tasks and back.modules == bundle.modules
    assert back.config == bundle.config and back.storage == bundle.storage
    for name, m in bundle.merged.items():
        got = back.merged[name]
        assert torch.equal(got.lambda_b, m.lambda_b) and torch.equal(got.lambda_d, m.lambda_d)
        assert torch.equal(got.routing, m.routing)
    assert all(torch.equal(x, y) for x, y in zip(back.projections, bundle.projections, strict=True))
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert (meta["format_version"], meta["adapter_kind"]) == (2, "vera")


def test_projections_stay_float32_in_a_float16_bundle(vera_set, tmp_path):
    bundle = merge_adapter_set(vera_set, "hydraopt", {"heads": 1, "refine_steps": 0})
    save_bundle(bundle, tmp_path / "b")  # float16 by default
    back = load_any_bundle(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(back.projections, bundle.projections, strict=True))
    name = bundle.modules[0].name
    assert torch.equal(back.merged[name].lambda_b, bundle.merged[name].lambda_b.half().float())


def test_lora_reader_refuses_a_vera_bundle_and_lora_bundles_stay_version_1(
    vera_set, make_adapter, tmp_path
):
    save_bundle(merge_adapter_set(vera_set, "task_arithmetic"), tmp_path / "v")
    with pytest.raises(HydraoptError, match="VERA bundle has no LoRA factors"):
        load_bundle(tmp_path / "v")
    lora = load_adapter_set([make_adapter("a"), make_adapter("b", seed=1)])
    save_bundle(merge_adapter_set(lora, "task_arithmetic"), tmp_path / "l")
    meta = json.loads((tmp_path / "l" / "bundle.json").read_text())
    assert meta["format_version"] == 1 and "adapter_kind" not in meta


def test_storage_accounting_by_hand(vera_set):
    """Tiny Llama: 2 layers x (q, o: d = 16; k, v: d = 8), r = 4, K = 3."""
    bundle = merge_adapter_set(vera_set, "hydraopt", {"heads": 2, "refine_steps": 0})
    per_layer_d, per_layer_r = 16 + 8 + 8 + 16, 4 * 4
    adapters = 3 * 2 * (per_layer_d + per_layer_r)  # K * Σ (d + r)
    merged = 2 * (2 * per_layer_d + per_layer_r)  # Σ (M d + r): λb routed, λd shared
    assert bundle.storage["adapters_params"] == adapters == 384
    assert bundle.storage["bundle_params"] == merged == 224
    assert bundle.storage["storage_percent"] == pytest.approx(100 * 224 / 384)
    assert bundle.storage["projection_params"] == 4 * 16 + 16 * 4
    other = merge_adapter_set(
        vera_set, "hydraopt", {"heads": 2, "shared": "lambda_b", "refine_steps": 0}
    )
    assert other.storage["bundle_params"] == 2 * (per_layer_d + 2 * per_layer_r)
    assert merge_adapter_set(vera_set, "ties").storage["bundle_params"] == 2 * (
        per_layer_d + per_layer_r
    )


def test_m_equals_one_stores_one_kth_like_the_paper():
    """Table 3 of the paper: S = 20 % for M = 1 of K = 5 VeRAs (projections not counted)."""
    mods = [ModuleSpec(f"m{i}", d=2048 if i % 2 else 512, k=2048, r=256) for i in range(8)]
    names = [m.name for m in mods]
    s = vera_storage_report(mods, 5, dict.fromkeys(names, 1), dict.fromkeys(names, 1), 10**6)
    assert s["storage_percent"] == pytest.approx(20.0)


@pytest.mark.parametrize("shared", ["lambda_d", "lambda_b"])
def test_export_loads_in_peft_and_gives_the_bundle_delta(vera_set, peft_deltas, tmp_path, shared):
    bundle = merge_adapter_set(
        vera_set, "hydraopt", {"heads": 2, "shared": shared, "refine_steps": 5}
    )
    written = export_peft_adapters(bundle, tmp_path / "out")
    assert sorted(written) == ["t0", "t1", "t2"]
    for task, path in written.items():
        config = json.loads((path / "adapter_config.json").read_text())
        original = bundle.adapter_configs[task]
        assert config == {**original, "inference_mode": True, "save_projection": True}
        reference = peft_deltas(path)  # PEFT's own ΔW, loaded unchanged
        assert set(reference) == {m.name for m in bundle.modules}
        for name, delta in reference.items():
            assert torch.allclose(delta, routed_delta(bundle, task, name), atol=1e-6), name


def test_export_of_unsaved_projection_adapters_is_self_contained(
    make_vera_adapter, peft_deltas, tmp_path
):
    """Inputs without projections: the export carries PEFT's regenerated ones, bit-exact, and
    with M = K on a shared λd it reproduces the inputs."""
    dirs = [
        make_vera_adapter(f"t{i}", seed=i, shared_d_seed=9, save_projection=False) for i in range(2)
    ]
    aset = load_adapter_set(dirs)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 0})
    written = export_peft_adapters(bundle, tmp_path / "out")
    for d, (task, path) in zip(dirs, written.items(), strict=True):
        ours, original = peft_deltas(path), peft_deltas(d)
        for name in original:
            assert torch.allclose(ours[name], original[name], atol=1e-5), (task, name)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("hydraopt", {"heads": 2, "shared": "lambda_d", "refine_steps": 0}),
        ("hydraopt", {"heads": 2, "shared": "lambda_b", "refine_steps": 0}),
        ("ties", {}),
        ("ties_a_only", {}),
    ],
)
def test_lora_view_gives_each_tasks_vera_update(vera_set, tmp_path, method, options):
    # The serving runtime reads every bundle kind through lora_view: heads[route] @ A' must be
    # the task's diag(λb) B diag(λd) A, computed here from task_vectors and the projections.
    save_bundle(merge_adapter_set(vera_set, method, options), tmp_path / "b", dtype="float32")
    bundle = load_any_bundle(tmp_path / "b")
    view = bundle.lora_view()
    assert list(view) == [m.name for m in bundle.modules]
    for spec in bundle.modules:
        a, heads, routing = view[spec.name]
        assert a.dtype == heads.dtype == torch.float32 and routing.dtype == torch.long
        assert a.shape == (spec.r, spec.k) and heads.shape[1:] == (spec.d, spec.r)
        assert heads.shape[0] == bundle.num_heads
        for i, task in enumerate(bundle.tasks):
            want = routed_delta(bundle, task, spec.name)
            got = heads[int(routing[i])] @ a
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
