"""Real PEFT adapters in the variations users arrive with, merged, exported and served, each
checked against PEFT's own numbers (docs/adapter-inputs.md lists what is supported).

The independent computations: PEFT's ``get_delta_weight`` of the original adapter (its scale
alpha/r or alpha/sqrt(r), rank/alpha patterns and dtype handled by PEFT, not by us), PEFT's
forward with the original or the exported adapter loaded, and each bundle's reported error
recomputed from PEFT's ΔW.
"""

from __future__ import annotations

import json

import pytest
import torch
from varied_adapters import edit_json, peft_delta_weights, peft_logits

import hydraopt
from hydraopt.cli.main import main
from hydraopt.runtime import load_model

IDS = torch.tensor([[5, 9, 14, 20, 7, 3, 30, 41]])

# name -> LoraConfig overrides (r 4, alpha 8, q/k/v/o unless set) of one adapter.
SUPPORTED = {
    "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True},
    "rank-alpha-pattern": {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 32}},
    "rslora-patterns": {
        "use_rslora": True,
        "rank_pattern": {"o_proj": 2},
        "alpha_pattern": {"q_proj": 3},
    },
    "dropout": {"lora_dropout": 0.1},
    "mlp": {"target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "all-linear": {"target_modules": "all-linear"},
    "layers-to-transform": {"layers_to_transform": [1]},
    "float16": {"dtype": torch.float16},
    "bfloat16": {"dtype": torch.bfloat16},
    "gaussian-init": {"init_lora_weights": "gaussian"},
    "orthogonal-init": {"init_lora_weights": "orthogonal"},
    "dotted-dir-name": {"name": "my.task.v1"},
    "non-default-adapter-name": {"adapter_name": "task-b"},  # PEFT saves it under t0/task-b/
}


def cli(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0


def view_delta(bundle, task_index: int) -> dict[str, torch.Tensor]:
    """ΔW'_i per module as the bundle stores it: heads[routing[i]] @ A'."""
    out = {}
    for name, (a, heads, routing) in bundle.lora_view().items():
        out[name] = heads[int(routing[task_index])] @ a  # (d, k)
    return out


def assert_deltas_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert set(got) == set(want) and want
    for name, w in want.items():
        scale = float(w.abs().max())
        assert scale > 0.05, name  # the adapter does something: the check can fail
        torch.testing.assert_close(got[name], w, atol=rtol * scale, rtol=0, msg=name)


@pytest.mark.parametrize(
    "method", [["--heads", "1", "--refine-steps", "0"], ["--method", "shared_basis", "--rank", "8"]]
)
@pytest.mark.parametrize("variant", sorted(SUPPORTED))
def test_one_adapter_round_trips_exactly_through_merge_export_and_runtime(
    variant, method, adapters, vbase, tmp_path
):
    """K = 1: the merge is exact (rank r, or R = 8 >= r), so the bundle, its PEFT export and the
    runtime must all equal PEFT's own reading of the original adapter."""
    (adapter,) = adapters(SUPPORTED[variant])
    want = peft_delta_weights(vbase, adapter)
    out, export = tmp_path / "bundle", tmp_path / "export"
    cli("merge", adapter, *method, "--dtype", "float32", "--out", out)
    bundle = hydraopt.load_any_bundle(out)
    assert_deltas_close(view_delta(bundle, 0), want)
    cli("export", out, "--out", export)
    assert_deltas_close(peft_delta_weights(vbase, export / bundle.tasks[0]), want)
    runtime = load_model(out, vbase)
    with torch.inference_mode():
        got = runtime([bundle.tasks[0]], input_ids=IDS).logits.float()
    want_logits = peft_logits(vbase, adapter, IDS)
    torch.testing.assert_close(got, want_logits, atol=1e-4, rtol=1e-4)
    assert (want_logits - peft_logits(vbase, None, IDS)).abs().max() > 0.01


def test_unknown_config_fields_of_a_newer_peft_still_load(adapters, vbase, tmp_path):
    (adapter,) = adapters({})
    edit_json(
        adapter / "adapter_config.json",
        peft_version="9.9.9",
        future_option={"nested": [1, 2]},
        lora_ga_config=None,
        init_lora_weights=None,  # PEFT skips its init: a plain LoRA
    )
    cli("merge", adapter, "--heads", "1", "--dtype", "float32", "--out", tmp_path / "b")
    cli("export", tmp_path / "b", "--out", tmp_path / "e")
    exported = json.loads((tmp_path / "e" / "t0" / "adapter_config.json").read_text())
    assert exported["future_option"] == {"nested": [1, 2]}  # kept for the user's PEFT


MIXED = (
    {"lora_alpha": 8},
    {"lora_alpha": 32, "use_rslora": True},
    {"alpha_pattern": {"q_proj": 3}, "lora_dropout": 0.1, "dtype": torch.bfloat16},
)
MIXED_METHODS = {
    "hydraopt-m2": ["--heads", "2", "--refine-steps", "3"],
    **{
        name: ["--method", name]  # every classic merge and its A-only variant
        for name in hydraopt.list_methods()
        if name not in ("hydraopt", "shared_basis")
    },
    "shared-basis-rank": ["--method", "shared_basis", "--rank", "4"],
    # a rank per module within the budget, stored at 8 bits (crashed: R differs per module)
    "shared-basis-budget-8bit": ["--method", "shared_basis", "--budget", "40", "--bits", "8"],
    "shared-basis-budget-4bit": ["--method", "shared_basis", "--budget", "40", "--bits", "4"],
    "hydraopt-budget-auto": ["--budget", "40", "--bits", "auto"],
}


@pytest.mark.parametrize("name", sorted(MIXED_METHODS))
def test_mixed_scales_errors_and_exports_agree_with_peft(name, adapters, vbase, tmp_path):
    """K = 3 adapters with different alphas, rsLoRA on one, an alpha pattern and bf16 weights on
    another: every error the bundle reports is its distance to PEFT's ΔW_i (a wrong scale for
    any task would show), and each task's export computes what the runtime does."""
    dirs = adapters(*MIXED)
    out, export = tmp_path / "bundle", tmp_path / "export"
    cli("merge", *dirs, *MIXED_METHODS[name], "--dtype", "float32", "--out", out)
    bundle = hydraopt.load_any_bundle(out)
    assert bundle.provenance.error_distance == "mae"
    runtime = load_model(out, vbase)
    cli("export", out, "--out", export)
    for i, (task, adapter) in enumerate(zip(bundle.tasks, dirs, strict=True)):
        want = peft_delta_weights(vbase, adapter)
        got = view_delta(bundle, i)
        for module, w in want.items():
            err = float((got[module] - w).abs().mean())
            assert bundle.provenance.errors[module][i] == pytest.approx(err, rel=1e-4, abs=1e-7)
        assert_deltas_close(peft_delta_weights(vbase, export / task), got)
        with torch.inference_mode():
            logits = runtime([task], input_ids=IDS).logits.float()
        torch.testing.assert_close(
            logits, peft_logits(vbase, export / task, IDS), atol=1e-4, rtol=1e-4
        )


def test_sweep_of_small_adapters_keeps_the_shared_basis_points_that_fit(adapters, tmp_path):
    """r = 4, K = 2 on 16-wide modules: a basis of R = 1 costs d + k + K per module, ~13 % of
    the adapters; the default 5 % point cannot exist, 10 % neither, 20 % can. The sweep used to
    refuse as a whole; it now runs the points that fit, and R = 1 when none does (K = 1)."""
    dirs = adapters({}, {})
    aset = hydraopt.load_adapter_set(dirs)
    floor = sum(m.d + m.k + 2 for m in aset.modules)  # U (d, 1), V (k, 1), one 1x1 core per task
    full = sum(2 * m.r * (m.d + m.k) for m in aset.modules)
    fits = [p for p in (5.0, 10.0, 20.0) if int(full * p / 100) >= floor]
    assert 0 < len(fits) < 3
    cli("sweep", *dirs, "--heads", "1", "--refine-steps", "0", "--out", tmp_path / "s2")
    labels = {
        p["label"] for p in json.loads((tmp_path / "s2" / "sweep.json").read_text())["points"]
    }
    assert {label for label in labels if label.startswith("shared_basis")} == {
        f"shared_basis {p:g} %" for p in fits
    }
    cli("sweep", dirs[0], "--refine-steps", "0", "--out", tmp_path / "s1")
    labels = {
        p["label"] for p in json.loads((tmp_path / "s1" / "sweep.json").read_text())["points"]
    }
    assert "shared_basis R=1" in labels


def test_evaluate_merge_from_runs_the_shared_basis_points_that_fit(adapters, tmp_path):
    """`evaluate --merge-from ROOT --methods shared_basis` on r = 4, K = 2 adapters: the same
    points as the sweep above (it failed as a whole on the 5 % point)."""
    from hydraopt.cli.evaluate import merged_systems
    from hydraopt.cli.main import build_parser

    dirs = adapters({"name": "en-qa"}, {"name": "en-gc"}, parent="root")
    argv = ["evaluate", "--tasks", "en-qa", "en-gc", "--merge-from", dirs[0].parent]
    argv += ["--out", tmp_path / "eval", "--methods", "shared_basis", "--heads", "--quiet"]
    systems = merged_systems(build_parser("evaluate").parse_args([str(a) for a in argv]), [])
    labels = [s.label for s in systems if s.label.startswith("shared_basis")]
    assert labels and all(" 20 %" in label for label in labels), labels


def test_a_peft_pickle_with_allow_pickle_merges_like_its_safetensors_twin(adapters, tmp_path):
    """``safe_serialization=False`` (adapter_model.bin): read tensors-only with --allow-pickle,
    the same weights as the safetensors file of the same adapter."""
    (pickled,) = adapters({"safe_serialization": False}, parent="bin")
    (safe,) = adapters({}, parent="st")
    assert (pickled / "adapter_model.bin").is_file()
    for src, out in ((pickled, "b-bin"), (safe, "b-st")):
        argv = ["merge", src, "--heads", "1", "--refine-steps", "0", "--dtype", "float32"]
        cli(*argv, "--allow-pickle", "--out", tmp_path / out)
    got, want = (view_delta(hydraopt.load_any_bundle(tmp_path / b), 0) for b in ("b-bin", "b-st"))
    assert_deltas_close(got, want, rtol=0)


def test_four_bit_shared_basis_keeps_every_task_of_mixed_scales(adapters, tmp_path):
    """The cores (K, R, R) of tasks whose scales differ ~10x (alpha 8 beside rsLoRA alpha 32) at
    4 bits: while quantization groups spanned tasks (R² = 16, groups of 64), the small tasks
    shared the large one's step, their cores rounded to zero and the bundle stored nothing for
    them (error = storing nothing, to the last digit, in every module). Groups now restart per
    task: every task's error is below storing nothing, as at 8 bits."""
    dirs = adapters(*MIXED)
    out = tmp_path / "b4"
    cli("merge", *dirs, "--method", "shared_basis", "--rank", "4", "--bits", "4", "--out", out)
    provenance = hydraopt.load_any_bundle(out).provenance
    for module, zero in provenance.zero_errors.items():
        for i, z in enumerate(zero):
            assert provenance.errors[module][i] < 0.999 * z, (module, i)
