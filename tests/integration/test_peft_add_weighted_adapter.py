"""Our classic merges, exported, equal PEFT's own add_weighted_adapter on the same adapters."""

from __future__ import annotations

import pytest
import torch

from hydraopt import export_peft_adapters, load_adapter_set, merge_adapter_set

PEFT_NAME = {
    "task_arithmetic": "linear",
    "ties": "ties",
    "magnitude_prune": "magnitude_prune",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magnitude_prune"])
def test_classic_merge_equals_add_weighted_adapter(method, make_adapter, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    paths = [make_adapter(f"t{i}", seed=i + 1, alpha=4 * (i + 1)) for i in range(3)]
    weights = [0.5, 1.0, 0.25]
    bundle = merge_adapter_set(
        load_adapter_set(paths), method, {"weights": tuple(weights), "density": 0.5}
    )
    exported = export_peft_adapters(bundle, tmp_path / "out")

    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tiny_base), paths[0], adapter_name="t0"
    )
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(p, adapter_name=f"t{i}")
    model.add_weighted_adapter(
        ["t0", "t1", "t2"], weights, "merged", combination_type=PEFT_NAME[method], density=0.5
    )
    ours = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), exported["t1"])
    for spec in bundle.modules:
        theirs = model.base_model.model.get_submodule(spec.name).get_delta_weight("merged")
        mine = ours.base_model.model.get_submodule(spec.name).get_delta_weight("default")
        assert torch.allclose(theirs, mine, atol=1e-6), spec.name
