"""Bundles round-trip bit-exactly; exports load in real PEFT and give the bundle's ΔW."""

from __future__ import annotations

import json

import pytest
import torch

from hydraopt import (
    export_peft_adapters,
    load_adapter_set,
    load_bundle,
    merge_adapter_set,
    save_bundle,
)
from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import FORMAT_VERSION, META_NAME


@pytest.fixture
def three_adapters(make_adapter):
    return [make_adapter(f"t{i}", seed=i + 1, alpha=8 * (i + 1)) for i in range(3)]


def test_bundle_round_trip_is_bit_exact_in_float32(three_adapters, tmp_path):
    aset = load_adapter_set(three_adapters)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 5})
    save_bundle(bundle, tmp_path / "b", dtype="float32")
    back = load_bundle(tmp_path / "b")
    assert back.tasks == bundle.tasks and back.method == "hydraopt"
    assert back.config == bundle.config and back.storage == bundle.storage
    for name, m in bundle.merged.items():
        a, heads, routing = m.A, m.heads, m.routing
        m2 = back.merged[name]
        a2, h2, r2 = m2.A, m2.heads, m2.routing
        assert torch.equal(a, a2) and torch.equal(heads, h2) and torch.equal(routing, r2)
    meta = json.loads((tmp_path / "b" / META_NAME).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["library_version"]


def test_existing_output_is_refused_and_kept(three_adapters, tmp_path):
    aset = load_adapter_set(three_adapters)
    bundle = merge_adapter_set(aset, "task_arithmetic")
    out = tmp_path / "results" / "b"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HydraoptError, match="already exists"):
        save_bundle(bundle, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(HydraoptError, match="did not write"):  # force replaces only our output
        save_bundle(bundle, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    save_bundle(bundle, out, force=True)  # an empty dir may be replaced
    save_bundle(bundle, out, force=True)  # and so may a bundle
    assert sorted(p.name for p in out.iterdir()) == [META_NAME, "tensors.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["b"]  # no temp dirs left behind


def test_round_trip_adapters_bundle_export_is_exact_when_a_is_shared(make_adapter, tmp_path):
    paths = [make_adapter(f"s{i}", seed=i + 1, shared_a_seed=42) for i in range(3)]
    aset = load_adapter_set(paths)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 3})
    save_bundle(bundle, tmp_path / "b", dtype="float32")
    written = export_peft_adapters(load_bundle(tmp_path / "b"), tmp_path / "out")
    again = load_adapter_set([written[t] for t in aset.tasks], list(aset.tasks))
    for spec in aset.modules:
        before, after = aset.load_stack([spec]), again.load_stack([spec])
        assert torch.allclose(before.delta(), after.delta(), atol=1e-6)
        # original config kept: same scale, same rank
        assert torch.equal(before.scale, after.scale)


def test_export_loads_in_peft_and_gives_the_bundle_delta(three_adapters, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    aset = load_adapter_set(three_adapters)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 10})
    save_bundle(bundle, tmp_path / "b", dtype="float32")
    written = export_peft_adapters(load_bundle(tmp_path / "b"), tmp_path / "out")
    for task in bundle.tasks:
        model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(tiny_base), written[task]
        )
        for name, (a, head) in bundle.task_factors(task).items():
            layer = model.base_model.model.get_submodule(name)
            peft_delta = layer.get_delta_weight("default")
            assert torch.allclose(peft_delta, head @ a, atol=1e-6), name


def test_export_refuses_existing_output_and_unknown_task(three_adapters, tmp_path):
    bundle = merge_adapter_set(load_adapter_set(three_adapters), "ties")
    (tmp_path / "out").mkdir()
    with pytest.raises(HydraoptError, match="already exists"):
        export_peft_adapters(bundle, tmp_path / "out")
    with pytest.raises(HydraoptError, match="not in the bundle"):
        export_peft_adapters(bundle, tmp_path / "out2", tasks=["nope"])
    assert not (tmp_path / "out2").exists()


def test_corrupt_or_foreign_bundles_are_refused(tmp_path):
    with pytest.raises(HydraoptError, match="not a hydraopt bundle"):
        load_bundle(tmp_path)
    (tmp_path / META_NAME).write_text(json.dumps({"format": "other"}))
    (tmp_path / "tensors.safetensors").write_bytes(b"")
    with pytest.raises(HydraoptError, match="not a hydraopt bundle"):
        load_bundle(tmp_path)


def test_lora_view_of_a_lora_bundle_is_its_factors_in_float32(tmp_path, make_adapter):
    aset = load_adapter_set([make_adapter(f"t{i}", seed=i + 1) for i in range(3)])
    save_bundle(merge_adapter_set(aset, "hydraopt", {"heads": 2}), tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")  # float16 on disk, float32 in memory
    view = bundle.lora_view()
    assert list(view) == [m.name for m in bundle.modules]
    for i, task in enumerate(bundle.tasks):
        for name, (a, head) in bundle.task_factors(task).items():
            v = view[name]
            assert v.A.dtype == v.heads.dtype == torch.float32 and v.routing.dtype == torch.long
            assert torch.equal(v.A, a) and torch.equal(v.heads[int(v.routing[i])], head)
