"""The registered ``shared_basis`` method end to end on tiny real PEFT adapters.

Every number is checked against an independent computation: the adapters' ΔW_i formed densely
from their files and PEFT's scale, the closed form called directly, PEFT loading the export.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import hydraopt
from hydraopt.errors import HydraoptError
from hydraopt.merge.registry import get_method, list_methods
from hydraopt.merge.shared_basis import SharedBasisConfig
from hydraopt.merge.shared_basis_refine import fit_shared_basis

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def dense_updates(paths, alpha: float = 8, r: int = 4) -> dict[str, torch.Tensor]:
    """module -> (K, d, k) ΔW_i = (alpha / r) B_i A_i, read straight from the adapter files."""
    out: dict[str, list[torch.Tensor]] = {}
    for p in paths:
        sd = load_file(str(p / "adapter_model.safetensors"))
        for key, a in sd.items():
            if ".lora_A." not in key:
                continue
            b = sd[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out.setdefault(name, []).append((alpha / r) * b.double() @ a.double())
    return {name: torch.stack(ds) for name, ds in out.items()}


@pytest.fixture
def adapters(make_adapter):
    return [make_adapter(f"t{i}", seed=i + 1) for i in range(3)]


def test_registered_with_its_config_and_no_vera():
    method = get_method("shared_basis")
    assert "shared_basis" in list_methods()
    assert method.config_class is SharedBasisConfig
    assert method.vera_config_class is None and not method.takes_heads
    assert method.num_heads(SharedBasisConfig(rank=2), 7) == 7  # one head U S_i per task


def test_bundle_equals_the_closed_form_and_its_errors_an_independent_recomputation(adapters):
    aset = hydraopt.load_adapter_set(adapters)
    bundle = hydraopt.merge_adapter_set(aset, "shared_basis", {"rank": 3})
    dense = dense_updates(adapters)
    for spec in bundle.modules:
        rec = bundle.merged[spec.name]
        assert rec.U.shape == (spec.d, 3) and rec.V.shape == (spec.k, 3)
        assert rec.cores.shape == (3, 3, 3)
        stack = aset.load_stack([spec])
        fit = fit_shared_basis(stack.A, stack.scaled_B, 3)
        want = fit.delta()[0]  # (K, d, k)
        got = rec.heads @ rec.A  # U S_i Vᵀ through the LoRA view
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        # the hard-routed MAE of the bundle, recomputed from the adapter files in float64
        mae = (dense[spec.name] - got.double()).abs().mean(dim=(1, 2))
        torch.testing.assert_close(
            torch.tensor(bundle.provenance.errors[spec.name], dtype=torch.float64),
            mae,
            atol=1e-7,
            rtol=1e-5,
        )
        zero = dense[spec.name].abs().mean(dim=(1, 2))
        torch.testing.assert_close(
            torch.tensor(bundle.provenance.zero_errors[spec.name], dtype=torch.float64),
            zero,
            rtol=1e-5,
            atol=0,
        )
        # LoRA view: A' = Vᵀ, one head per task, identity routing
        view = bundle.lora_view()[spec.name]
        assert torch.equal(view.routing, torch.arange(3))
        assert view.heads.shape == (3, spec.d, 3) and view.A.shape == (3, spec.k)


def test_exact_when_the_adapters_share_their_row_space(make_adapter):
    # K = 2 adapters with the same A: the stacked updates have rank <= K r = 8 on the left and
    # r = 4 on the right, so R = 8 (<= min(d, k) for every module) reconstructs them exactly.
    paths = [make_adapter(f"s{i}", seed=i + 1, shared_a_seed=7) for i in range(2)]
    bundle = hydraopt.merge_adapter_set(
        hydraopt.load_adapter_set(paths), "shared_basis", {"rank": 8}
    )
    dense = dense_updates(paths)
    for spec in bundle.modules:
        rec = bundle.merged[spec.name]
        err = (rec.heads.double() @ rec.A.double() - dense[spec.name]).abs().max()
        assert err < 1e-5 * dense[spec.name].abs().max(), spec.name


@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_budget_is_never_exceeded_and_bytes_are_exact(adapters, tmp_path, core):
    aset = hydraopt.load_adapter_set(adapters)
    K = 3
    full = sum(K * 4 * (m.d + m.k) for m in aset.modules)  # the adapters' parameters
    for pct in (12.0, 30.0, 55.0):
        bundle = hydraopt.merge_adapter_set(
            aset, "shared_basis", {"budget": pct, "core": core}, bytes_per_param=2
        )
        out = hydraopt.save_bundle(bundle, tmp_path / f"{core}-{pct}")
        meta = json.loads((out / "bundle.json").read_text())
        ranks = {m["name"]: m["rank"] for m in meta["modules"]}
        per_core = (lambda R: R * R) if core == "full" else (lambda R: R)
        params = sum(
            (m["d"] + m["k"]) * ranks[m["name"]] + K * per_core(ranks[m["name"]])
            for m in meta["modules"]
        )
        assert params <= math.floor(full * pct / 100)
        assert meta["storage"]["bundle_params"] == params
        assert meta["storage"]["adapters_params"] == full
        assert meta["storage"]["bundle_bytes"] == 2 * params
        tensors = load_file(str(out / "tensors.safetensors"))
        assert sum(t.numel() for t in tensors.values()) == params
        assert all(t.dtype == torch.float16 for t in tensors.values())
        assert meta["tensor_layout"] == "shared_basis" and meta["method"] == "shared_basis"
        assert meta["config"]["budget"] == pct and meta["config"]["core"] == core
        loaded = hydraopt.load_bundle(out)
        for name, rec in loaded.merged.items():
            assert rec.rank == ranks[name] and rec.core == core
            torch.testing.assert_close(rec.U, bundle.merged[name].U.half().float())


def test_budget_spends_where_the_error_falls_most(adapters):
    # more budget never leaves a larger error (the allocation is monotone on these curves)
    aset = hydraopt.load_adapter_set(adapters)
    errs = []
    for pct in (10.0, 30.0, 60.0):
        b = hydraopt.merge_adapter_set(aset, "shared_basis", {"budget": pct})
        errs.append(sum(sum(v) for v in b.provenance.errors.values()))
    assert errs[0] > errs[1] > errs[2]


def test_impossible_ranks_and_budgets_are_one_line_errors(adapters):
    aset = hydraopt.load_adapter_set(adapters)
    with pytest.raises(HydraoptError, match=r"--rank 9 exceeds module .*min\(d, k\) = 8"):
        hydraopt.merge_adapter_set(aset, "shared_basis", {"rank": 9})
    with pytest.raises(HydraoptError, match="below the smallest shared basis"):
        hydraopt.merge_adapter_set(aset, "shared_basis", {"budget": 1.0})
    with pytest.raises(HydraoptError, match="exactly one of --rank"):
        hydraopt.merge_adapter_set(aset, "shared_basis", {"rank": 2, "budget": 10.0})
    with pytest.raises(HydraoptError, match="exactly one of --rank"):
        hydraopt.merge_adapter_set(aset, "shared_basis", {})


def test_peft_loads_the_export_and_its_delta_equals_the_bundle(adapters, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    aset = hydraopt.load_adapter_set(adapters)
    bundle = hydraopt.merge_adapter_set(aset, "shared_basis", {"budget": 30.0})
    ranks = {name: rec.rank for name, rec in bundle.merged.items()}
    assert len(set(ranks.values())) > 1  # per-module ranks: rank_pattern is exercised
    hydraopt.save_bundle(bundle, tmp_path / "bundle", dtype="float32")
    loaded = hydraopt.load_bundle(tmp_path / "bundle")
    hydraopt.export_peft_adapters(loaded, tmp_path / "export")
    for i, task in enumerate(loaded.tasks):
        model = LlamaForCausalLM.from_pretrained(tiny_base)
        peft = PeftModel.from_pretrained(model, str(tmp_path / "export" / task))
        seen = 0
        for name, module in peft.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            rec = loaded.merged[name]
            assert module.r["default"] == rec.rank, name
            want = rec.heads[i] @ rec.A  # U S_i Vᵀ from the bundle, (d, k)
            torch.testing.assert_close(
                module.get_delta_weight("default"), want, atol=1e-7, rtol=1e-6
            )
            seen += 1
        assert seen == len(loaded.modules)


def test_a_direct_merge_call_needs_a_rank(adapters):
    aset = hydraopt.load_adapter_set(adapters)
    stack = aset.load_stack(list(aset.modules[:1]))
    from hydraopt.merge.base import MergeContext

    with pytest.raises(HydraoptError, match="needs a rank"):
        get_method("shared_basis").merge(
            stack,
            SharedBasisConfig(budget=10.0),
            generator=torch.Generator(),
            context=MergeContext(3, 2),
        )


def test_a_tampered_shared_basis_bundle_is_refused_in_one_line(adapters, tmp_path):
    from safetensors.torch import save_file

    bundle = hydraopt.merge_adapter_set(
        hydraopt.load_adapter_set(adapters), "shared_basis", {"rank": 2}
    )
    good = hydraopt.save_bundle(bundle, tmp_path / "good")
    meta = json.loads((good / "bundle.json").read_text())
    name = meta["modules"][0]["name"]

    def refused(tmp, match, meta_edit=None, tensors_edit=None):
        import shutil

        d = tmp_path / tmp
        shutil.copytree(good, d)
        m = json.loads(json.dumps(meta))
        if meta_edit:
            meta_edit(m)
        (d / "bundle.json").write_text(json.dumps(m))
        if tensors_edit:
            t = load_file(str(d / "tensors.safetensors"))
            tensors_edit(t)
            save_file(t, str(d / "tensors.safetensors"))
        with pytest.raises(HydraoptError, match=match):
            hydraopt.load_bundle(d)

    refused("layout", "tensor_layout must be one of", lambda m: m.update(tensor_layout="x"))
    refused("rank", "rank must be an integer", lambda m: m["modules"][0].update(rank=0))
    refused("core", "core must be", lambda m: m["modules"][0].update(core="tucker"))
    refused("shape", "has shape", lambda m: m["modules"][0].update(rank=3))
    refused("missing", "no tensor", tensors_edit=lambda t: t.pop(f"{name}.cores"))
    # without the layout field, an older reader's view: A and heads are missing
    refused("old", "no tensor", lambda m: m.pop("tensor_layout"))


def test_cli_merge_inspect_export_end_to_end(adapters, tmp_path, capsys):
    from hydraopt.cli.main import main

    out = tmp_path / "bundle"
    args = ["merge", *map(str, adapters), "--method", "shared_basis", "--out", str(out)]
    assert main([*args, "--budget", "40"]) == 0
    text = capsys.readouterr().out
    ranks = [m["rank"] for m in json.loads((out / "bundle.json").read_text())["modules"]]
    ranks.sort()
    median = (ranks[len(ranks) // 2 - 1] + ranks[len(ranks) // 2]) / 2  # 8 modules: even
    assert (
        f"rank R per module: min {ranks[0]}, median {median:g}, max {ranks[-1]} "
        f"over 8 modules (core full)" in text
    )
    assert main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    assert "rank R per module" in capsys.readouterr().out
    shown = json.loads((tmp_path / "i.json").read_text())["bundle"]
    assert sorted(shown["ranks"].values()) == ranks
    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "t0" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["rank_pattern"]

    # impossible ranks and budgets: one line on stderr, exit 2, nothing written
    for bad, msg in (
        (["--rank", "9"], "--rank 9 exceeds module"),
        (["--budget", "1"], "--budget 1 % is below the smallest shared basis"),
        (["--budget", "0"], "--budget is a percentage in (0, 100]"),
        ([], "give exactly one of --rank R"),
    ):
        dest = tmp_path / "bad"
        code = main(
            ["merge", *map(str, adapters), "--method", "shared_basis", "--out", str(dest), *bad]
        )
        err = capsys.readouterr().err
        assert code == 2 and msg in err and err.count("\n") == 1, (bad, err)
        assert not dest.exists()


def test_sweep_runs_shared_basis_points_and_evaluate_reads_its_bundles(adapters, tmp_path, capsys):
    from hydraopt.cli.main import main
    from hydraopt.eval.systems import bundle_system
    from hydraopt.sweep import plan_sweep

    # default points: budgets of 5, 10 and 20 %; a given rank or budget: that one point
    runs = plan_sweep(["shared_basis"], 3)
    assert [r.label for r in runs] == ["shared_basis 5 %", "shared_basis 10 %", "shared_basis 20 %"]
    assert [r.dirname for r in runs][0] == "shared_basis_5pct"
    assert [
        r.label for r in plan_sweep(["shared_basis"], 3, options={"shared_basis": {"rank": 2}})
    ] == ["shared_basis R=2"]
    out = tmp_path / "sweep"
    argv = ["sweep", *map(str, adapters), "--out", str(out), "--heads", "1"]
    assert (
        main([*argv, "--baselines", "ties", "shared_basis", "--budget", "30", "--save-bundles"])
        == 0
    )
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["label"] for p in points] == ["hydraopt M=1", "ties", "shared_basis 30 %"]
    assert points[2]["storage_percent"] <= 30.0 and points[2]["heads"] == 3
    # evaluate's bundle system reads the saved bundle: label with its point, U S_i and Vᵀ
    system = bundle_system(out / "bundles" / "shared_basis_30pct")
    assert system.label == "shared_basis 30 %"
    loaded = hydraopt.load_bundle(out / "bundles" / "shared_basis_30pct")
    for name, (a, b, scale) in system.adapter("t1").items():
        rec = loaded.merged[name]
        assert scale == 1.0
        torch.testing.assert_close(b @ a, rec.U @ rec.cores[1] @ rec.V.T)
