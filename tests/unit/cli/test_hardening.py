"""The CLI under attack and under clumsy use: exit 2, one line on stderr, nothing else touched.

Every case snapshots the whole test directory (paths, modes and bytes) before the command and
compares after it: a refused command writes nothing anywhere — not outside ``--out``, not a
temp dir beside it, not a parent directory — and deletes nothing of the user's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from bundle_factory import edit_meta, edit_tensors
from conftest import edit_config
from safetensors.torch import load_file, save_file

from hydraopt.cli.main import main
from hydraopt.io.atomic import hydraopt_output_kind
from hydraopt.io.bundle import load_bundle

MERGE = ["--heads", "1", "--refine-steps", "0"]


@pytest.fixture
def adapters(make_adapter, tmp_path):
    return [str(make_adapter(f"task{i}", seed=i + 1, parent=tmp_path / "in")) for i in range(2)]


@pytest.fixture
def bundle(adapters, tmp_path, capsys) -> Path:
    out = tmp_path / "r" / "b"
    assert main(["merge", *adapters, *MERGE, "--dtype", "float32", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root`` -> (mode, sha256 of the bytes, "" for dirs and links)."""
    out = {}
    for p in sorted(root.rglob("*")):
        data = "" if p.is_dir() or p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = (p.lstat().st_mode, data)
    return out


def refused(argv: list[str], root: Path, capsys, *, expect: str) -> str:
    """Run the CLI; assert exit 2, one stderr line containing ``expect``, ``root`` unchanged."""
    capsys.readouterr()
    before = snapshot(root)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hydraopt: error: ") and err.count("\n") == 1, err
    assert expect in err, err
    assert snapshot(root) == before
    return err


def test_names_that_escape_out_are_refused_at_merge(adapters, tmp_path, capsys):
    for names, why in [
        (["../escaped", "ok"], "starts with '.'"),
        ([str(tmp_path / "abs"), "ok"], "path separators"),
        (["a/b", "ok"], "path separators"),
        (["..", "ok"], "starts with '.'"),
        (["a\nb", "ok"], "control characters"),
    ]:
        argv = ["merge", *adapters, "--names", *names, *MERGE, "--out", tmp_path / "r" / "b"]
        refused(argv, tmp_path, capsys, expect=why)


def test_a_bundle_naming_escaping_tasks_cannot_write_outside_out(bundle, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    for name in ["../escaped", str(target), "", ".."]:
        edit_meta(bundle, lambda m, name=name: m.__setitem__("tasks", [name, "task1"]))
        out = tmp_path / "r" / "x" / "out"
        refused(["export", bundle, "--out", out], tmp_path, capsys, expect="task name")
        refused(["inspect", bundle], tmp_path, capsys, expect="task name")
    assert not target.exists() and not (tmp_path / "r" / "x").exists()


def test_export_tasks_option_cannot_escape(bundle, tmp_path, capsys):
    # The temp dir is r/.x.tmp-*: "../escaped" would land in r/, inside the snapshot.
    argv = ["export", bundle, "--tasks", "task0", "../escaped", "--out", tmp_path / "r" / "x"]
    refused(argv, tmp_path, capsys, expect="not in the bundle")


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda m: m["routing"].update({k: [-1, 0] for k in m["routing"]}), "holds -1"),
        (lambda m: m["routing"].update({k: [0, 5] for k in m["routing"]}), "holds 5"),
        (lambda m: m["routing"].update({k: [0] for k in m["routing"]}), "one head per task"),
        (lambda m: m.__setitem__("format_version", "1"), "format_version"),
        (lambda m: m.__setitem__("format_version", 1.5), "format_version"),
        (lambda m: m["modules"].pop(), ""),  # tensors for a module not listed are ignored
        (lambda m: m["modules"][0].__setitem__("d", 7), "shape"),
        (lambda m: m["scales"]["task0"].update({k: 0 for k in m["scales"]["task0"]}), "scale"),
        (lambda m: m.__setitem__("adapter_kind", ["lora"]), "adapter_kind"),
    ],
)
def test_corrupt_bundle_metadata_is_refused_by_export_and_inspect(
    bundle, tmp_path, capsys, change, expect
):
    edit_meta(bundle, change)
    if not expect:  # a consistent subset still loads
        assert main(["export", str(bundle), "--out", str(tmp_path / "x")]) == 0
        return
    refused(["export", bundle, "--out", tmp_path / "x"], tmp_path, capsys, expect=expect)
    refused(["inspect", bundle], tmp_path, capsys, expect=expect)


def test_non_finite_or_missing_bundle_tensors_are_refused(bundle, tmp_path, capsys):
    key = next(k for k in load_file(str(bundle / "tensors.safetensors")) if k.endswith(".heads"))
    edit_tensors(bundle, lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    refused(["export", bundle, "--out", tmp_path / "x"], tmp_path, capsys, expect="NaN or Inf")
    edit_tensors(bundle, lambda t: t.pop(key))
    refused(["export", bundle, "--out", tmp_path / "x"], tmp_path, capsys, expect="no tensor")


def test_force_never_deletes_user_files_an_input_or_the_cwd(
    adapters, bundle, tmp_path, capsys, monkeypatch
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    merge = ["merge", *adapters, *MERGE, "--force", "--out"]
    refused([*merge, mine], tmp_path, capsys, expect="did not write")
    refused([*merge, adapters[0]], tmp_path, capsys, expect="is the input")
    refused([*merge, tmp_path / "in"], tmp_path, capsys, expect="holds the input")
    refused(["export", bundle, "--out", bundle, "--force"], tmp_path, capsys, expect="is the input")
    refused(
        ["sweep", *adapters, "--out", mine, "--force"], tmp_path, capsys, expect="did not write"
    )
    (bundle / "notes.txt").write_text("my notes")  # a bundle the user added files to
    refused([*merge, bundle], tmp_path, capsys, expect="did not write")
    (bundle / "notes.txt").unlink()
    monkeypatch.chdir(bundle)
    refused([*merge, "."], tmp_path, capsys, expect="names no new directory")
    refused(["export", bundle, "--out", ".", "--force"], tmp_path, capsys, expect="names no new")
    monkeypatch.chdir(tmp_path)
    refused([*merge, tmp_path], tmp_path, capsys, expect="current directory")


def test_force_replaces_hydraopt_outputs_of_every_kind(adapters, bundle, tmp_path, capsys):
    export = tmp_path / "x"
    assert main(["export", str(bundle), "--out", str(export)]) == 0
    assert main(["export", str(bundle), "--out", str(export), "--force"]) == 0
    assert main(["merge", *adapters, *MERGE, "--out", str(export), "--force"]) == 0
    assert load_bundle(export).num_heads == 1  # an export replaced by a bundle
    assert main(["merge", *adapters, "--heads", "2", "--out", str(bundle), "--force"]) == 0
    assert load_bundle(bundle).num_heads == 2
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["b"]
    sweep = ["sweep", *adapters, "--heads", "1", "--baselines", "ties", "--save-bundles"]
    assert main([*sweep, "--out", str(tmp_path / "s")]) == 0
    assert hydraopt_output_kind(tmp_path / "s") == "sweep"
    assert main([*sweep, "--out", str(tmp_path / "s"), "--force"]) == 0
    assert main(["merge", *adapters, *MERGE, "--out", str(tmp_path / "s"), "--force"]) == 0
    assert load_bundle(tmp_path / "s").num_heads == 1  # a sweep replaced by a bundle


def test_output_parent_that_cannot_hold_a_dir_is_refused_before_the_merge(
    adapters, tmp_path, capsys, monkeypatch
):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "b"
    called = []
    monkeypatch.setattr("hydraopt.engine.merge_adapter_set", lambda *a, **k: called.append(1))
    refused(["merge", *adapters, *MERGE, "--out", out], tmp_path, capsys, expect="not a directory")
    assert called == []


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"lora_alpha": "8"}, "lora_alpha must be a finite non-zero number"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
        ({"rank_pattern": {"[": 4}}, "not a valid regex"),
        ({"r": "4"}, "no valid rank"),
    ],
)
def test_bad_config_values_are_refused(adapters, tmp_path, capsys, change, expect):
    edit_config(Path(adapters[1]), **change)
    refused(["merge", *adapters, *MERGE, "--out", tmp_path / "b"], tmp_path, capsys, expect=expect)


def test_configs_that_are_not_objects_and_integer_tensors_are_refused(adapters, tmp_path, capsys):
    cfg = Path(adapters[1]) / "adapter_config.json"
    original = cfg.read_text()
    argv = ["merge", *adapters, *MERGE, "--out", tmp_path / "b"]
    for text in ["[1, 2]", '"LORA"', "null"]:
        cfg.write_text(text)
        refused(argv, tmp_path, capsys, expect="JSON object")
    cfg.write_text(original)
    weights = Path(adapters[1]) / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: (v * 100).to(torch.int64) for k, v in tensors.items()}, str(weights))
    refused(argv, tmp_path, capsys, expect="must be floating point")


def test_a_malicious_pickle_is_refused_with_one_line(adapters, tmp_path, capsys):
    import os

    evil_dir = Path(adapters[1])
    tensors = load_file(str(evil_dir / "adapter_model.safetensors"))
    (evil_dir / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    torch.save({**tensors, "x": Payload()}, evil_dir / "adapter_model.bin")
    argv = ["merge", *adapters, *MERGE, "--allow-pickle", "--out", tmp_path / "b"]
    err = refused(argv, tmp_path, capsys, expect="not a plain pickle of tensors")
    assert "weights_only" not in err and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        (["--device", "foo"], "unknown device 'foo'"),
        (["--device", "meta"], "runs on cpu or cuda"),
        (["--threads", "-1"], "threads must be a positive integer"),
        (["--threads", "0"], "threads must be a positive integer"),
        (["--solver", "paper", "--lr", "nan"], "lr must be a finite number"),
        (["--solver", "paper", "--lr", "-1"], "lr must be > 0"),
        (["--solver", "paper", "--temperature", "inf"], "temperature must be a finite number"),
    ],
)
def test_unusable_engine_options_are_refused_before_the_merge(
    adapters, tmp_path, capsys, monkeypatch, options, expect
):
    monkeypatch.setattr("hydraopt.engine.merge_adapter_set", lambda *a, **k: 1 / 0)
    argv = ["merge", *adapters, *MERGE, *options, "--out", tmp_path / "b"]
    refused(argv, tmp_path, capsys, expect=expect)
    if options[0] != "--device":
        refused(
            ["sweep", *adapters, *options, "--out", tmp_path / "s"], tmp_path, capsys, expect=expect
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(adapters, tmp_path, capsys):
    argv = ["merge", *adapters, *MERGE, "--device", "cuda", "--out", tmp_path / "b"]
    refused(argv, tmp_path, capsys, expect="CUDA is not available")


def test_written_files_follow_the_umask(bundle, tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    assert bundle.stat().st_mode & 0o777 == 0o777 & ~mask
    for f in bundle.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["tasks"] == ["task0", "task1"]


def test_deeply_nested_json_is_one_line_not_a_recursion_error(adapters, bundle, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    (bundle / "bundle.json").write_text(deep)
    refused(["export", bundle, "--out", tmp_path / "x"], tmp_path, capsys, expect="corrupt bundle")
    (Path(adapters[1]) / "adapter_config.json").write_text(deep)
    argv = ["merge", *adapters, *MERGE, "--out", tmp_path / "b"]
    refused(argv, tmp_path, capsys, expect="not valid JSON")


def test_an_adapter_given_as_dot_needs_explicit_names(adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(adapters[0])
    argv = ["merge", ".", adapters[1], *MERGE, "--out", tmp_path / "b"]
    err = refused(argv, tmp_path, capsys, expect="task name '' is empty")
    assert "pass names" in err
    assert main([*map(str, argv), "--names", "first", "second"]) == 0


@pytest.mark.parametrize(
    "command", [["evaluate", "--tasks", "en-qa", "--system", "zero-shot"], ["finetune", "en-qa"]]
)
def test_eval_commands_refuse_bad_threads_in_one_line(command, tmp_path, capsys):
    from hydraopt.cli.main import main

    assert main([*command, "--out", str(tmp_path / "o"), "--threads", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "threads must be a positive integer" in err
    assert not (tmp_path / "o").exists()


def test_finetune_refuses_a_user_dir_naming_the_cli_flag(tmp_path, capsys):
    from hydraopt.cli.main import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["finetune", "en-qa", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "force=True" not in err
    assert (out / "notes.txt").read_text() == "keep"
