"""The command line on VeRA adapter folders: merge/export/inspect/sweep, one-line refusals."""

from __future__ import annotations

import json

import pytest

from hydraopt.cli.main import main
from hydraopt.io.bundle import load_any_bundle
from hydraopt.types import VeraBundle


@pytest.fixture
def vera_root(make_vera_adapter, tmp_path):
    for i in range(3):
        make_vera_adapter(f"task{i}", seed=i + 1, parent=tmp_path / "in")
    return tmp_path / "in"


def bad_exit(argv, capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hydraopt: error: ") and err.count("\n") == 1, err
    return err


def test_merge_export_inspect_a_folder_of_vera_adapters(vera_root, tmp_path, capsys):
    out = tmp_path / "bundle"
    argv = ["merge", str(vera_root), "--heads", "2", "--shared", "lambda_b", "--out", str(out)]
    assert main([*argv, "--refine-steps", "5"]) == 0
    assert "bundle written" in capsys.readouterr().out
    bundle = load_any_bundle(out)
    assert isinstance(bundle, VeraBundle) and bundle.num_heads == 2
    assert bundle.config["shared"] == "lambda_b" and bundle.tasks == ("task0", "task1", "task2")

    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
    for t in bundle.tasks:
        config = json.loads((tmp_path / "peft" / t / "adapter_config.json").read_text())
        assert config["peft_type"] == "VERA" and config["save_projection"] is True

    assert main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    shown = capsys.readouterr().out
    assert "worst" in shown and "mean |lambda_d_i - lambda_d_j|" in shown
    report = json.loads((tmp_path / "i.json").read_text())
    assert set(report["bundle"]["error_by_task"]) == set(bundle.tasks)

    assert main(["inspect", str(vera_root)]) == 0
    shown = capsys.readouterr().out
    assert "hydraopt M=3 (shared lambda_b)" in shown and "lambda_b" in shown


@pytest.mark.parametrize("method", ["ties", "dare_linear_a_only"])
def test_merge_classic_methods_on_vera(vera_root, tmp_path, method):
    out = tmp_path / method
    assert main(["merge", str(vera_root), "--method", method, "--out", str(out)]) == 0
    assert load_any_bundle(out).method == method


def test_sweep_over_vera_adapters(vera_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(vera_root), "--out", str(out), "--refine-steps", "3"]
    assert main([*argv, "--baselines", "task_arithmetic", "ties"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    labels = [p["label"] for p in result["points"]]
    assert labels == ["hydraopt M=1", "hydraopt M=2", "hydraopt M=3", "task_arithmetic", "ties"]
    storage = [p["storage_percent"] for p in result["points"]]
    assert storage[0] == pytest.approx(100 / 3) and storage[3] == pytest.approx(100 / 3)
    assert result["points"][2]["error"] < result["points"][0]["error"]


def test_vera_refusals_are_one_line(vera_root, make_adapter, tmp_path, capsys):
    out = tmp_path / "never"
    lora = make_adapter("lora", parent=tmp_path / "l")
    assert "cannot be merged together" in bad_exit(
        ["merge", str(vera_root), str(lora), "--heads", "1", "--out", str(out)], capsys
    )
    assert "do not apply" in bad_exit(
        ["merge", str(vera_root), "--heads", "1", "--solver", "paper", "--out", str(out)], capsys
    )
    assert "do not apply" in bad_exit(
        ["merge", str(lora), "--heads", "1", "--shared", "lambda_b", "--out", str(out)], capsys
    )
    assert not out.exists()
