"""The command line end to end on tiny real PEFT adapters: outputs, exit codes, nothing left behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import edit_config

from hydraopt.cli.main import main
from hydraopt.devices import resolve_precision
from hydraopt.io.bundle import load_bundle


@pytest.fixture
def adapters(make_adapter, tmp_path):
    return [str(make_adapter(f"task{i}", seed=i + 1, parent=tmp_path / "in")) for i in range(3)]


def test_merge_export_inspect(adapters, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["merge", *adapters, "--heads", "2", "--out", str(out), "--refine-steps", "5"]) == 0
    text = capsys.readouterr().out
    assert "S %" in text and "bundle written" in text
    bundle = load_bundle(out)
    assert bundle.method == "hydraopt" and bundle.config["heads"] == 2 and bundle.num_heads == 2
    assert bundle.tasks == ("task0", "task1", "task2")

    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
    for t in bundle.tasks:
        assert (tmp_path / "peft" / t / "adapter_model.safetensors").is_file()
        assert (
            json.loads((tmp_path / "peft" / t / "adapter_config.json").read_text())["peft_type"]
            == "LORA"
        )

    plot = tmp_path / "sim.png"
    assert main(["inspect", str(out), "--plot", str(plot), "--json", str(tmp_path / "i.json")]) == 0
    shown = capsys.readouterr().out
    assert "worst" in shown and "mean |A_i - A_j| / mean |A|" in shown
    assert plot.stat().st_size > 1000
    report = json.loads((tmp_path / "i.json").read_text())
    assert set(report["bundle"]["error_by_task"]) == set(bundle.tasks)


def test_merge_passes_the_fast_solver_options(adapters, tmp_path):
    out = tmp_path / "bundle"
    argv = ["merge", *adapters, "--heads", "1", "--out", str(out), "--refine-steps", "3"]
    argv += ["--refine-precision", "float32", "--refine-tasks", "2", "--start", "closed_form"]
    assert main(argv) == 0
    config = load_bundle(out).config
    assert (config["refine_precision"], config["refine_tasks"]) == ("float32", 2)
    # The start is chosen only when each step sees every task (refine_tasks >= K = 3).
    assert "start" not in config
    argv = ["merge", *adapters, "--heads", "1", "--refine-steps", "3", "--start", "closed_form"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert load_bundle(tmp_path / "s").config["start"] == "closed_form"
    # Left out, they keep the config's defaults.
    assert main(["merge", *adapters, "--heads", "1", "--out", str(tmp_path / "d")]) == 0
    default = load_bundle(tmp_path / "d").config
    # "auto" is recorded as the path it took on this machine.
    assert (default["refine_precision"], default["refine_tasks"], default["start"]) == (
        resolve_precision("auto", torch.device("cpu")),
        8,
        "auto",
    )


def test_merge_holds_the_result_in_the_bundle_dtype(adapters, tmp_path, monkeypatch):
    """At M = K the result grows with K: the CLI keeps it in --dtype, and writes the same bits
    as the library's float32 result cast at the save."""
    import torch

    from hydraopt import load_adapter_set, merge_adapter_set
    from hydraopt.io import bundle as io_bundle

    held = set()
    save = io_bundle.save_bundle

    def spy(bundle, out, **kwargs):
        held.update(t.dtype for m in bundle.merged.values() for t in (m.A, m.heads))
        return save(bundle, out, **kwargs)

    monkeypatch.setattr(io_bundle, "save_bundle", spy)  # the CLI imports it when it runs
    out = tmp_path / "bundle"
    assert main(["merge", *adapters, "--heads", "3", "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert held == {torch.bfloat16}
    written = load_bundle(out).merged
    for name, m in merge_adapter_set(
        load_adapter_set(adapters), "hydraopt", {"heads": 3}
    ).merged.items():
        assert torch.equal(written[name].A.to(torch.bfloat16), m.A.to(torch.bfloat16))
        assert torch.equal(written[name].heads.to(torch.bfloat16), m.heads.to(torch.bfloat16))
        assert torch.equal(written[name].routing, m.routing)


def test_fast_solver_options_are_checked(adapters, tmp_path, capsys):
    out = tmp_path / "never"
    merge = ["merge", *adapters, "--heads", "1", "--out", str(out)]
    assert "refine_tasks must be >= 1" in bad_exit([*merge, "--refine-tasks", "0"], capsys)
    with pytest.raises(SystemExit):  # argparse refuses a choice it does not know
        main([*merge, "--refine-precision", "float64"])
    assert not out.exists()


def test_inspect_adapter_dirs_lists_storage_for_every_m(adapters, capsys):
    assert main(["inspect", *adapters]) == 0
    text = capsys.readouterr().out
    assert "hydraopt M=3" in text and "B/A" in text


def test_sweep_writes_json_table_and_plot(adapters, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                *adapters,
                "--out",
                str(out),
                "--refine-steps",
                "3",
                "--baselines",
                "ties",
                "task_arithmetic_a_only",
            ]
        )
        == 0
    )
    result = json.loads((out / "sweep.json").read_text())
    labels = [p["label"] for p in result["points"]]
    assert labels == [
        "hydraopt M=1",
        "hydraopt M=2",
        "hydraopt M=3",
        "ties",
        "task_arithmetic_a_only",
    ]
    s = {p["label"]: p["storage_percent"] for p in result["points"]}
    assert s["ties"] == pytest.approx(100 / 3) and s["task_arithmetic_a_only"] == s["hydraopt M=3"]
    errors = [p["error"] for p in result["points"][:3]]
    assert errors[0] >= errors[1] >= errors[2]  # more heads never fit worse
    assert (out / "sweep.png").stat().st_size > 1000 and "| ties |" in (
        out / "sweep.md"
    ).read_text()


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "task_arithmetic", "magnitude_prune", "dare_linear"]
)
def test_merge_classic_methods(adapters, tmp_path, method):
    out = tmp_path / method
    assert (
        main(
            [
                "merge",
                *adapters,
                "--method",
                method,
                "--out",
                str(out),
                "--density",
                "0.7",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    b = load_bundle(out)
    assert b.method == method and b.num_heads == 1
    # task_arithmetic sparsifies nothing: its bundle leaves the unused density out.
    assert b.config.get("density") == (None if method == "task_arithmetic" else 0.7)


def bad_exit(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hydraopt: error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_exit_nonzero_with_one_line_and_write_nothing(
    adapters, make_adapter, tmp_path, capsys
):
    out = tmp_path / "never"
    assert "needs heads" in bad_exit(["merge", *adapters, "--out", str(out)], capsys)
    assert "exceeds" in bad_exit(["merge", *adapters, "--heads", "4", "--out", str(out)], capsys)
    assert "stores 1 head" in bad_exit(
        ["merge", *adapters, "--method", "ties", "--heads", "2", "--out", str(out)], capsys
    )
    assert "not found" in bad_exit(
        ["merge", *adapters, str(tmp_path / "missing"), "--heads", "1", "--out", str(out)], capsys
    )
    dora = make_adapter("dora", seed=9, parent=tmp_path / "bad")
    edit_config(dora, use_dora=True)
    capsys.readouterr()  # drop the fixture's own output
    assert "DoRA" in bad_exit(
        ["merge", *adapters, str(dora), "--heads", "1", "--out", str(out)], capsys
    )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".never")] == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    assert "already exists" in bad_exit(
        ["merge", *adapters, "--heads", "1", "--out", str(existing)], capsys
    )
    assert (existing / "mine.txt").read_text() == "keep"
    assert "not a hydraopt bundle" in bad_exit(
        ["export", str(existing), "--out", str(tmp_path / "x")], capsys
    )


def test_force_replaces_an_existing_output(adapters, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    assert (
        main(
            [
                "merge",
                *adapters,
                "--heads",
                "1",
                "--out",
                str(out),
                "--force",
                "--refine-steps",
                "0",
            ]
        )
        == 0
    )
    assert load_bundle(out).num_heads == 1


def test_merge_on_the_ray_engine(adapters, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray-bundle"
    assert main(["merge", *adapters, "--method", "ties", "--out", str(out), "--engine", "ray"]) == 0
    assert load_bundle(out).num_heads == 1


def test_merge_skips_files_a_glob_caught(adapters, tmp_path, capsys):
    readme = tmp_path / "in" / "README.md"
    readme.write_text("# adapters\n")
    out = tmp_path / "bundle"
    argv = ["merge", *adapters, str(readme), "--method", "task_arithmetic", "--out", str(out)]
    assert main(argv) == 0
    assert f"skipping {readme}: a file, not an adapter directory" in capsys.readouterr().err
    assert load_bundle(out).tasks == ("task0", "task1", "task2")
    assert readme.read_text() == "# adapters\n"
