"""Loading PEFT adapter dirs: scales folded correctly, every bad input refused clearly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import edit_config
from safetensors.torch import load_file, save_file

from hydraopt.errors import HydraoptError
from hydraopt.io.peft import load_adapter_set


def test_loads_real_peft_dirs_with_names_shapes_and_scales(make_adapter):
    a = make_adapter("alpha", r=4, alpha=8, seed=1)
    b = make_adapter("beta", r=4, alpha=16, seed=2)
    aset = load_adapter_set([a, b])
    assert aset.tasks == ("alpha", "beta")
    assert len(aset.modules) == 8  # 2 layers x q/k/v/o
    q = next(m for m in aset.modules if m.name.endswith("layers.0.self_attn.q_proj"))
    kk = next(m for m in aset.modules if m.name.endswith("layers.0.self_attn.k_proj"))
    assert (q.d, q.k, q.r) == (16, 16, 4) and (kk.d, kk.k, kk.r) == (8, 16, 4)
    assert aset.scales["alpha"][q.name] == 2.0 and aset.scales["beta"][q.name] == 4.0
    stack = aset.load_stack([q])
    raw = load_file(str(a / "adapter_model.safetensors"))
    assert torch.equal(stack.A[0, 0], raw[f"base_model.model.{q.name}.lora_A.weight"])
    assert aset.load_stack([q]).A.dtype == torch.float32


def test_names_override_and_must_be_unique(make_adapter):
    a = make_adapter("alpha")
    b = make_adapter("beta", seed=3)
    assert load_adapter_set([a, b], ["x", "y"]).tasks == ("x", "y")
    with pytest.raises(HydraoptError, match="unique"):
        load_adapter_set([a, b], ["x", "x"])


def test_rslora_rank_pattern_and_alpha_pattern_are_folded(make_adapter):
    a = make_adapter(
        "p", r=4, alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}
    )
    aset = load_adapter_set([a])
    by = {m.name.rsplit(".", 1)[1] + m.name.split(".")[2]: m for m in aset.modules}
    q = by["q_proj0"]
    assert q.r == 2
    assert aset.scales["p"][q.name] == pytest.approx(8 / math.sqrt(2))
    assert aset.scales["p"][by["v_proj0"].name] == pytest.approx(32 / math.sqrt(4))
    assert aset.scales["p"][by["k_proj0"].name] == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "biases"),
        ({"peft_type": "IA3"}, "peft_type"),
    ],
)
def test_unsupported_features_are_refused_by_name(make_adapter, change, message):
    a = make_adapter("a")
    edit_config(a, **change)
    with pytest.raises(HydraoptError, match=message):
        load_adapter_set([a])


def test_mismatches_are_refused(make_adapter, tmp_path):
    base = make_adapter("base", r=4)
    other_rank = make_adapter("rank", r=2, parent=tmp_path / "x")
    with pytest.raises(HydraoptError, match="shapes|rank"):
        load_adapter_set([base, other_rank])
    other_base = make_adapter("model", seed=5, parent=tmp_path / "y")
    edit_config(other_base, base_model_name_or_path="someone/else")
    with pytest.raises(HydraoptError, match="base model"):
        load_adapter_set([base, other_base])
    fewer = make_adapter("fewer", seed=6, parent=tmp_path / "z")
    f = fewer / "adapter_model.safetensors"
    t = load_file(str(f))
    save_file({k: v for k, v in t.items() if "q_proj" not in k}, str(f))
    with pytest.raises(HydraoptError, match="target modules differ"):
        load_adapter_set([base, fewer])


def test_missing_and_corrupt_files(make_adapter, tmp_path):
    with pytest.raises(HydraoptError, match="not found"):
        load_adapter_set([tmp_path / "nope"])
    a = make_adapter("a")
    (a / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(HydraoptError, match="corrupt"):
        load_adapter_set([a])
    b = make_adapter("b", seed=2)
    (b / "adapter_config.json").write_text("{not json")
    with pytest.raises(HydraoptError, match="JSON"):
        load_adapter_set([b])
    c = make_adapter("c", seed=3)
    (c / "adapter_config.json").unlink()
    with pytest.raises(HydraoptError, match="adapter_config.json"):
        load_adapter_set([c])


def test_nan_and_inf_are_refused(make_adapter):
    for bad in (float("nan"), float("inf")):
        a = make_adapter(f"bad{bad}")
        f = a / "adapter_model.safetensors"
        t = load_file(str(f))
        key = next(k for k in t if "lora_B" in k)
        t[key][0, 0] = bad
        save_file(t, str(f))
        with pytest.raises(HydraoptError, match="NaN or Inf"):
            load_adapter_set([a])


def test_extra_tensors_are_refused(make_adapter):
    a = make_adapter("a")
    f = a / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(16)
    save_file(t, str(f))
    with pytest.raises(HydraoptError, match="unsupported tensor"):
        load_adapter_set([a])


def test_pickles_need_an_explicit_flag(make_adapter):
    a = make_adapter("a")
    st = a / "adapter_model.safetensors"
    tensors = load_file(str(st))
    torch.save(tensors, a / "adapter_model.bin")
    st.unlink()
    with pytest.raises(HydraoptError, match="allow-pickle"):
        load_adapter_set([a])
    aset = load_adapter_set([a], allow_pickle=True)
    spec = aset.modules[0]
    assert torch.equal(
        aset.load_stack([spec]).A[0, 0], tensors[f"base_model.model.{spec.name}.lora_A.weight"]
    )


def test_fp16_inputs_are_upcast_to_float32(make_adapter):
    a = make_adapter("h", dtype=torch.float16)
    stack = load_adapter_set([a]).load_stack([load_adapter_set([a]).modules[0]])
    assert stack.A.dtype == torch.float32 and stack.B.dtype == torch.float32
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_a_folder_of_adapters_expands_to_its_adapter_dirs(make_adapter, tmp_path):
    parent = tmp_path / "many"
    for name in ("b-task", "a-task"):
        make_adapter(name, parent=parent, seed=len(name))
    (parent / "notes").mkdir()  # not an adapter: ignored
    aset = load_adapter_set([parent])
    assert aset.tasks == ("a-task", "b-task")
