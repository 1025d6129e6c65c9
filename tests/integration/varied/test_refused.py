"""Real PEFT adapters that hydraopt cannot merge correctly: every entry point refuses them in one
line on stderr with exit 2, writing nothing and touching no input (docs/adapter-inputs.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from unit.cli.test_hardening import refused
from varied_adapters import build_vera

import hydraopt
from hydraopt.cli.main import main

MERGES = {
    "hydraopt": ["--heads", "1", "--refine-steps", "0"],
    "ties": ["--method", "ties"],
    "shared_basis": ["--method", "shared_basis", "--rank", "2"],
}


def _truncate(p: Path) -> None:
    f = p / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _empty(p: Path) -> None:
    (p / "adapter_model.safetensors").write_bytes(b"")


def _missing(p: Path) -> None:
    (p / "adapter_model.safetensors").unlink()


# name -> (LoraConfig overrides of the second adapter (the first is plain), its file edit, the
# words the one error line must hold)
REFUSED = {
    "pissa": ({"init_lora_weights": "pissa"}, None, "changes the base weights"),
    "pissa-niter": ({"init_lora_weights": "pissa_niter_2"}, None, "changes the base weights"),
    "olora": ({"init_lora_weights": "olora"}, None, "changes the base weights"),
    "dora": ({"use_dora": True}, None, "DoRA"),
    "bias-lora-only": ({"bias": "lora_only"}, None, "biases"),
    "bias-all": ({"bias": "all"}, None, "biases"),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "fewer-targets": ({"target_modules": ["q_proj", "v_proj"]}, None, "target modules differ"),
    "mlp-targets": ({"target_modules": ["gate_proj", "up_proj"]}, None, "target modules differ"),
    "other-layers": ({"layers_to_transform": [0]}, None, "target modules differ"),
    "other-rank": ({"r": 8}, None, "has rank 8 but"),
    "pickle": ({"safe_serialization": False}, None, "--allow-pickle"),
    "truncated": ({}, _truncate, "corrupt safetensors"),
    "empty": ({}, _empty, "corrupt safetensors"),
    "missing": ({}, _missing, "missing adapter_model.safetensors"),
}


@pytest.mark.parametrize("method", sorted(MERGES))
@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_merge_refuses_in_one_line(variant, method, adapters, tmp_path, capsys, monkeypatch):
    spec, edit, expect = REFUSED[variant]
    first, second = adapters({}, spec)
    if edit is not None:
        edit(second)
    # No pickle is ever opened without --allow-pickle: torch.load must not run at all.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    argv = ["merge", first, second, *MERGES[method], "--out", tmp_path / "out" / "b"]
    refused(argv, tmp_path, capsys, expect=expect)


@pytest.mark.parametrize("variant", ["pissa", "dora", "other-rank", "truncated"])
def test_sweep_and_inspect_refuse_the_same_inputs(variant, adapters, tmp_path, capsys):
    spec, edit, expect = REFUSED[variant]
    first, second = adapters({}, spec)
    if edit is not None:
        edit(second)
    refused(["sweep", first, second, "--out", tmp_path / "s"], tmp_path, capsys, expect=expect)
    refused(["inspect", first, second], tmp_path, capsys, expect=expect)


def test_pissa_really_changes_the_base_weights_on_load(adapters, vbase):
    """Why PiSSA is refused: PEFT loading the adapter rewrites the base weights from their SVD,
    so the adapter's update is not s B A, which is all that its files hold."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    (adapter,) = adapters({"init_lora_weights": "pissa"})
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(vbase), str(adapter))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    original = LlamaForCausalLM.from_pretrained(vbase).model.layers[0].self_attn.q_proj.weight
    assert (layer.base_layer.weight - original).abs().max() > 0.1


def test_an_adapter_given_twice_is_named(adapters, tmp_path, capsys):
    (adapter,) = adapters({})
    argv = ["merge", adapter, adapter, "--heads", "1", "--out", tmp_path / "b"]
    refused(argv, tmp_path, capsys, expect="adapter dir given twice")
    # with --names it is two tasks on purpose, and merges
    argv = [*argv, "--names", "a", "b", "--refine-steps", "0"]
    assert main([str(a) for a in argv]) == 0


def test_evaluate_merge_from_refuses_before_loading_a_model(adapters, tmp_path, capsys):
    first, second = adapters({}, {"init_lora_weights": "olora"}, parent="root")
    argv = ["evaluate", "--tasks", first.name, second.name, "--merge-from", first.parent]
    argv += ["--model", tmp_path / "no-such-model", "--out", tmp_path / "eval"]
    refused(argv, tmp_path, capsys, expect="changes the base weights")


def test_vera_adapters_with_other_projection_seeds_are_refused(vbase, tmp_path, capsys):
    dirs = [build_vera(vbase, tmp_path / f"v{i}", seed=i, projection_prng_key=i) for i in (1, 2)]
    refused(
        ["merge", *dirs, "--heads", "1", "--out", tmp_path / "b"],
        tmp_path,
        capsys,
        expect="projection_prng_key 2 differs",
    )


def test_vera_adapters_with_other_d_initial_merge_and_round_trip(vbase, tmp_path):
    """d_initial only sets λd's starting value: adapters differing in it share projections."""
    from varied_adapters import peft_delta_weights

    dirs = [
        build_vera(vbase, tmp_path / f"v{i}", seed=i, d_initial=d) for i, d in enumerate((0.1, 0.5))
    ]
    argv = ["merge", *dirs, "--heads", "2", "--refine-steps", "0", "--dtype", "float32"]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "b"]]) == 0
    assert main(["export", str(tmp_path / "b"), "--out", str(tmp_path / "e")]) == 0
    bundle = hydraopt.load_any_bundle(tmp_path / "b")
    for i, task in enumerate(bundle.tasks):
        got = peft_delta_weights(vbase, tmp_path / "e" / task)
        for name, (a, heads, routing) in bundle.lora_view().items():
            want = heads[int(routing[i])] @ a
            assert float(want.abs().max()) > 0.01
            torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-4)


def test_evaluate_refuses_a_base_changing_lora_system(adapters, tmp_path, capsys):
    """PEFT applies OLoRA by rewriting the base weights in place and unloading keeps them: every
    later row of the table would have run on a changed base model."""
    (adapter,) = adapters({"init_lora_weights": "olora", "name": "en-qa"}, parent="root")
    argv = ["evaluate", "--tasks", adapter.name, "--system", f"lora={adapter.parent}"]
    argv += ["--model", tmp_path / "no-such-model", "--out", tmp_path / "eval"]
    refused(argv, tmp_path, capsys, expect="changes the base weights")
