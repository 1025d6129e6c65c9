"""Loading PEFT VeRA dirs: projections bit-exact with PEFT, ΔW equal to PEFT's, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import edit_config
from safetensors.torch import load_file, save_file

from hydraopt.errors import HydraoptError
from hydraopt.io.peft import load_adapter_set
from hydraopt.kinds.vera.load import VeraAdapterSet, load_vera_adapter_set
from hydraopt.kinds.vera.projections import vera_projections


def test_projections_are_bit_exact_with_peft(tiny_base):
    """Our regeneration against the buffers PEFT itself builds (A then B, fan-in per tensor)."""
    from peft import VeraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(tiny_base),
        VeraConfig(r=3, target_modules=["q_proj", "k_proj", "down_proj"], projection_prng_key=11),
    )
    peft_a = model.base_model.vera_A["default"]  # (r, max_in): max_in = intermediate (32)
    peft_b = model.base_model.vera_B["default"]  # (max_out, r)
    ours_a, ours_b = vera_projections(11, 3, peft_a.shape[1], peft_b.shape[0])
    assert peft_a.shape == (3, 32) and peft_b.shape == (16, 3)
    assert torch.equal(ours_a, peft_a) and torch.equal(ours_b, peft_b)


@pytest.mark.parametrize("save_projection", [True, False])
def test_delta_of_loaded_stack_equals_peft_delta(make_vera_adapter, peft_deltas, save_projection):
    dirs = [
        make_vera_adapter(f"t{i}", seed=i, prng_key=5, save_projection=save_projection)
        for i in range(2)
    ]
    aset = load_adapter_set(dirs)
    assert isinstance(aset, VeraAdapterSet) and aset.kind == "vera"
    assert aset.tasks == ("t0", "t1")
    assert aset.in_features_source.startswith("base model")
    shapes = {m.name.rsplit(".", 1)[-1]: (m.d, m.k, m.r) for m in aset.modules}
    assert shapes == {
        "q_proj": (16, 16, 4),
        "k_proj": (8, 16, 4),
        "v_proj": (8, 16, 4),
        "o_proj": (16, 16, 4),
    }
    for i, d in enumerate(dirs):
        reference = peft_deltas(d)
        assert set(reference) == {m.name for m in aset.modules}
        for spec in aset.modules:
            ours = aset.load_stack([spec]).delta()[0, i]
            assert torch.allclose(ours, reference[spec.name], atol=1e-6), spec.name


def test_fp16_and_pickled_adapters(make_vera_adapter, tmp_path):
    half = make_vera_adapter("half", dtype=torch.float16)
    stack = load_adapter_set([half]).load_stack([load_adapter_set([half]).modules[0]])
    assert stack.lambda_b.dtype == torch.float32
    pickled = make_vera_adapter("pickled", seed=1)
    tensors = load_file(str(pickled / "adapter_model.safetensors"))
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    with pytest.raises(HydraoptError, match="allow-pickle"):
        load_adapter_set([pickled])
    aset = load_adapter_set([pickled], allow_pickle=True)
    spec = aset.modules[0]
    key = f"base_model.model.{spec.name}.vera_lambda_b"
    assert torch.equal(aset.load_stack([spec]).lambda_b[0, 0], tensors[key])


def test_mixed_lora_and_vera_are_refused(make_vera_adapter, make_adapter):
    vera, lora = make_vera_adapter("v"), make_adapter("l")
    with pytest.raises(HydraoptError, match="LoRA and VeRA adapters cannot be merged together"):
        load_adapter_set([vera, lora])
    with pytest.raises(HydraoptError, match="cannot be merged together"):
        load_adapter_set([lora, vera])


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"prng_key": 1}, "projection_prng_key"),
        ({"r": 3}, "rank r"),
        ({"save_projection": False}, "save_projection"),
        ({"targets": ["q_proj", "v_proj"]}, "target modules differ"),
    ],
)
def test_adapters_that_do_not_share_projections_are_refused(make_vera_adapter, other, message):
    first = make_vera_adapter("a")
    second = make_vera_adapter("b", seed=1, **other)
    with pytest.raises(HydraoptError, match=message) as info:
        load_adapter_set([first, second])
    assert str(second) in str(info.value)


def test_other_base_model_and_tampered_projections_are_refused(make_vera_adapter):
    first, second = make_vera_adapter("a"), make_vera_adapter("b", seed=1)
    edit_config(second, base_model_name_or_path="someone/else")
    with pytest.raises(HydraoptError, match="base model"):
        load_adapter_set([first, second])
    third = make_vera_adapter("c", seed=2)
    f = third / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.5
    save_file(tensors, str(f))
    with pytest.raises(HydraoptError, match="saved vera_A/vera_B differ") as info:
        load_adapter_set([first, third])
    assert str(third) in str(info.value) and str(first) in str(info.value)


def test_bad_vectors_are_refused(make_vera_adapter):
    bad = make_vera_adapter("bad")
    f = bad / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("vera_lambda_d"))
    tensors[key] = torch.zeros(5)  # r = 4
    save_file(tensors, str(f))
    with pytest.raises(HydraoptError, match=r"len\(λd\) = 5 but the config says r = 4"):
        load_adapter_set([bad])
    nan = make_vera_adapter("nan")
    f = nan / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("vera_lambda_b"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(HydraoptError, match="NaN or Inf"):
        load_adapter_set([nan])
    extra = make_vera_adapter("extra")
    f = extra / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(f))
    with pytest.raises(HydraoptError, match="unsupported tensor"):
        load_adapter_set([extra])


def test_config_features_are_refused_by_name(make_vera_adapter):
    adapter = make_vera_adapter("a")
    edit_config(adapter, modules_to_save=["lm_head"])
    with pytest.raises(HydraoptError, match="modules_to_save"):
        load_adapter_set([adapter])
    edit_config(adapter, modules_to_save=None, bias="all")
    with pytest.raises(HydraoptError, match="biases"):
        load_adapter_set([adapter])


@pytest.mark.parametrize("save_projection", [True, False])
def test_without_base_shapes_k_is_assumed_max_in_and_matches_peft(
    make_vera_adapter, peft_deltas, save_projection
):
    """Llama attention: every q/k/v/o reads hidden_size = vera_A's width, so k = max_in holds
    (and, unsaved, max_in = max_out = the longest λb)."""
    dirs = [make_vera_adapter(f"t{i}", seed=i, save_projection=save_projection) for i in range(2)]
    for d in dirs:
        edit_config(d, base_model_name_or_path="not/a/local/model")
    aset = load_vera_adapter_set(dirs)
    assert aset.in_features_source == "assumed: k = max_in"
    assert {m.k for m in aset.modules} == {16}
    reference = peft_deltas(dirs[1])  # PEFT with the real base model
    for spec in aset.modules:
        ours = aset.load_stack([spec]).delta()[0, 1]
        assert torch.allclose(ours, reference[spec.name], atol=1e-6), spec.name


def test_unknown_input_features_are_refused_or_taken_from_the_base_model(
    make_vera_adapter, peft_deltas, tiny_base
):
    """down_proj reads intermediate_size: without the base model's shapes we refuse."""
    targets = ["q_proj", "down_proj"]
    adapter = make_vera_adapter("mlp", targets=targets)
    edit_config(adapter, base_model_name_or_path="not/a/local/model")
    with pytest.raises(HydraoptError, match="--base-model"):
        load_adapter_set([adapter])
    aset = load_adapter_set([adapter], base_model=tiny_base)
    assert {m.name.rsplit(".", 1)[-1]: m.k for m in aset.modules} == {"q_proj": 16, "down_proj": 32}
    edit_config(adapter, base_model_name_or_path=str(tiny_base))
    reference = peft_deltas(adapter)
    for spec in aset.modules:
        ours = aset.load_stack([spec]).delta()[0, 0]
        assert torch.allclose(ours, reference[spec.name], atol=1e-6), spec.name
