"""``evaluate --merge-from --bits --budget``: the systems of the task-quality table in bytes
(issue 19), built on tiny adapters without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest

import hydraopt.budget_merge
import hydraopt.eval.harness as harness
from hydraopt.cli.evaluate import build_budget_bundles, merged_systems
from hydraopt.cli.main import build_parser, main
from hydraopt.errors import HydraoptError
from hydraopt.eval.quantized_lora import QuantizedLora
from hydraopt.eval.systems import BundleSystem, PerTaskLora, ZeroShot

TASKS = ["t0", "t1"]


@pytest.fixture
def root(make_adapter, tmp_path) -> Path:
    for i, task in enumerate(TASKS):
        make_adapter(task, seed=i + 1, parent=tmp_path / "adapters")
    return tmp_path / "adapters"


def parse(root: Path, out: Path, *flags: str):
    argv = ["evaluate", "--tasks", *TASKS, "--merge-from", str(root), "--out", str(out)]
    return build_parser("evaluate").parse_args([*argv, "--methods", "--heads", "--quiet", *flags])


def test_rows_are_the_separate_adapters_at_every_width_and_the_budgets(root, tmp_path) -> None:
    out = tmp_path / "eval"
    args = parse(root, out, "--bits", "16", "8", "4", "--group-size", "16", "--budget", "30", "60")
    systems = merged_systems(args, [])
    labels = [s.label for s in systems]
    assert labels[:4] == ["zero-shot", "LoRA", "LoRA 8-bit", "LoRA 4-bit"]
    assert [type(s) for s in systems[:4]] == [ZeroShot, PerTaskLora, QuantizedLora, QuantizedLora]
    assert [(s.bits, s.group_size, s.tasks) for s in systems[2:4]] == [
        (8, 16, tuple(TASKS)),
        (4, 16, tuple(TASKS)),
    ]
    budgets = systems[4:]
    assert [s.label.split(" %")[0] for s in budgets] == [
        "hydraopt budget 30",
        "hydraopt budget 60",
    ]
    for system, percent in zip(budgets, (30, 60), strict=True):
        assert isinstance(system, BundleSystem)
        assert system.path == out / "bundles" / f"hydraopt_budget{percent}_16-8-4-bit"
        storage = system.bundle.storage
        assert storage.bundle_bytes <= int(percent / 100 * storage.adapters_bytes)
        assert system.bundle.config["budget"] == percent
    # The separate 4-bit adapters sit below 30 % of the 16-bit bytes (4.25 bits per value).
    assert systems[3].storage_percent < systems[2].storage_percent < 100.0


def test_budget_bundles_equal_merge_budget_and_are_reused(root, tmp_path, monkeypatch) -> None:
    out = tmp_path / "eval"
    args = parse(root, out, "--bits", "16", "4", "--group-size", "16", "--budget", "40")
    (path,) = build_budget_bundles(args)
    merged = tmp_path / "merged"
    dirs = [str(root / t) for t in TASKS]
    argv = ["merge", *dirs, "--budget", "40", "--bits", "auto", "--group-size", "16"]
    # merge's auto widths are 16/8/4; evaluate's are --bits: compare at the same widths.
    args_auto = parse(root, tmp_path / "eval2", "--bits", "16", "8", "4", "--group-size", "16")
    args_auto.budget = [40.0]
    (auto,) = build_budget_bundles(args_auto)
    assert main([*argv, "--out", str(merged)]) == 0
    tensors = "tensors.safetensors"
    assert (auto / tensors).read_bytes() == (merged / tensors).read_bytes()

    def no_merge(*a, **k):
        raise AssertionError("a cached budget bundle must be reused")

    monkeypatch.setattr(hydraopt.budget_merge, "budget_candidates", no_merge)
    assert build_budget_bundles(args) == [path]
    other = parse(root, out, "--bits", "16", "4", "--group-size", "32", "--budget", "40")
    with pytest.raises(HydraoptError, match="group size 16, not 40 % at"):
        build_budget_bundles(other)


def test_several_budgets_share_one_set_of_merges(root, tmp_path, monkeypatch) -> None:
    calls = []
    real = hydraopt.budget_merge.budget_candidates

    def counting(*a, **k):
        calls.append(k["least_percent"])
        return real(*a, **k)

    monkeypatch.setattr(hydraopt.budget_merge, "budget_candidates", counting)
    args = parse(root, tmp_path / "e", "--bits", "16", "4", "--budget", "50", "35", "70")
    assert len(build_budget_bundles(args)) == 3
    assert calls == [35.0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "0"], "percentage in (0, 100]"),
        (["--budget", "10", "10"], "lists a value twice"),
        (["--budget", "10", "--bits", "16"], "below the smallest bundle"),
    ],
)
def test_bad_budgets_are_one_line_before_the_model(
    root, tmp_path, monkeypatch, capsys, flags, message
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad command")

    monkeypatch.setattr(harness, "load_base_model", no_model)
    out = tmp_path / "o"
    argv = ["evaluate", "--tasks", *TASKS, "--merge-from", str(root), "--out", str(out)]
    assert main([*argv, "--methods", "--heads", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (out / "results.json").exists()


def test_budget_needs_merge_from(tmp_path, capsys) -> None:
    argv = ["evaluate", "--tasks", "en-qa", "--system", "zero-shot", "--budget", "20"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "--budget merges the adapters of --merge-from" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_each_system_names_its_plot_curve(root, tmp_path) -> None:
    """results.png joins HydraOpt per width and budget mode apart: each row says which it is."""
    from hydraopt.eval.report import curve_of

    args = parse(
        root,
        tmp_path / "eval",
        "--heads",
        "1",
        "--bits",
        "16",
        "4",
        "--group-size",
        "16",
        "--budget",
        "60",
    )
    systems = merged_systems(args, [])
    curves = {s.label: curve_of(s.describe()) for s in systems}
    assert curves == {
        "zero-shot": "16-bit",
        "LoRA": "16-bit",
        "LoRA 4-bit": "4-bit",
        "hydraopt M=1": "16-bit",
        "hydraopt M=1 4-bit": "4-bit",
        next(s.label for s in systems if "budget" in s.label): "budget mode",
    }
    by_label = {s.label: s for s in systems}
    assert by_label["hydraopt M=1"].describe()["bits"] == []
    assert by_label["hydraopt M=1 4-bit"].describe()["bits"] == [4]
    assert curve_of({"bits": [8, 4]}) == "8/4-bit"
