"""``--bits`` / ``--group-size`` on the command line, end to end on tiny real PEFT adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hydraopt.cli.main import main
from hydraopt.io.bundle import load_bundle


@pytest.fixture
def adapters(make_adapter, tmp_path):
    return [str(make_adapter(f"task{i}", seed=i + 1, parent=tmp_path / "in")) for i in range(3)]


def bad_exit(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hydraopt: error: ") and err.count("\n") == 1, err
    return err


def test_merge_bits_4_then_export_dequantizes_to_16_bit_peft(adapters, tmp_path):
    out = tmp_path / "b4"
    argv = ["merge", *adapters, "--heads", "2", "--refine-steps", "3", "--out", str(out)]
    assert main([*argv, "--bits", "4", "--group-size", "32"]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["format_version"] == 3
    assert {e["bits"] for e in meta["quantization"].values()} == {4}
    assert {e["group_size"] for e in meta["quantization"].values()} == {32}
    bundle = load_bundle(out)
    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
    for task in bundle.tasks:
        sd = load_file(str(tmp_path / "peft" / task / "adapter_model.safetensors"))
        assert {t.dtype for t in sd.values()} == {torch.float16}
        for name, (a, _head) in bundle.task_factors(task).items():
            key = f"base_model.model.{name}.lora_A.weight"
            assert torch.equal(sd[key], a.to(torch.float16))


def test_merge_bits_16_is_byte_identical_to_no_flag(adapters, tmp_path):
    argv = ["merge", *adapters, "--method", "ties"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--bits", "16", "--group-size", "32"]) == 0
    bytes_a = (tmp_path / "a" / "tensors.safetensors").read_bytes()
    assert bytes_a == (tmp_path / "b" / "tensors.safetensors").read_bytes()
    meta_a = json.loads((tmp_path / "a" / "bundle.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "bundle.json").read_text())
    for meta in (meta_a, meta_b):
        meta["extra"].pop("merge_seconds")
    assert meta_a == meta_b and meta_a["format_version"] == 1


def test_merge_ties_at_8_bits(adapters, tmp_path):
    out = tmp_path / "t8"
    assert main(["merge", *adapters, "--method", "ties", "--bits", "8", "--out", str(out)]) == 0
    bundle = load_bundle(out)
    stored = load_file(str(out / "tensors.safetensors"))
    assert bundle.storage.bundle_bytes == sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bits", "3"], "--bits must be 16, 8, 4 or auto"),
        (["--bits", "auto"], "--bits auto picks a width per module"),
        (["--bits", "4", "--group-size", "7"], "even"),
        (["--bits", "4", "--group-size", "0"], ">= 2"),
    ],
)
def test_bad_bits_exit_2_with_one_line_and_write_nothing(
    adapters, tmp_path, capsys, flags, message
):
    out = tmp_path / "never"
    assert message in bad_exit(
        ["merge", *adapters, "--heads", "1", "--out", str(out), *flags], capsys
    )
    assert not out.exists()


def test_sweep_in_bytes_with_separate_quantized_points(adapters, tmp_path, capsys):
    from hydraopt import load_adapter_set
    from hydraopt.quantize import dequantize, quantize, quantized_nbytes

    out = tmp_path / "sw"
    argv = ["sweep", *adapters, "--out", str(out), "--heads", "1", "2", "--baselines", "ties"]
    assert main([*argv, "--bits", "16", "4", "--group-size", "32", "--refine-steps", "2"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    labels = [p["label"] for p in result["points"]]
    assert labels == [
        "hydraopt M=1",
        "hydraopt M=1 4-bit",
        "hydraopt M=2",
        "hydraopt M=2 4-bit",
        "ties",
        "ties 4-bit",
        "separate 4-bit",
    ]
    sep = result["points"][-1]
    aset = load_adapter_set(adapters)
    nbytes, errors = 0, []
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        for i in range(3):
            a, b = stack.A[0, i], stack.B[0, i]
            nbytes += quantized_nbytes(a.numel(), 4, 32) + quantized_nbytes(b.numel(), 4, 32)
            approx = stack.scale[0, i] * (
                dequantize(quantize(b, 4, 32)) @ dequantize(quantize(a, 4, 32))
            )
            errors.append(float((stack.scale[0, i] * b @ a - approx).abs().mean()))
    assert sep["bytes"] == nbytes
    assert sep["error"] == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    assert result["reference_bytes"] == 2 * sum(3 * m.r * (m.d + m.k) for m in aset.modules)
    assert sep["storage_percent"] == pytest.approx(100 * nbytes / result["reference_bytes"])
    by_label = {p["label"]: p for p in result["points"]}
    assert by_label["hydraopt M=2 4-bit"]["bytes"] < by_label["hydraopt M=2"]["bytes"]
    assert all(isinstance(p["pareto"], bool) for p in result["points"])
    assert "| separate 4-bit | 4 |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0


def test_sweep_default_points_keep_their_keys(adapters, tmp_path):
    out = tmp_path / "sw"
    argv = ["sweep", *adapters, "--out", str(out), "--heads", "1", "--baselines"]
    assert main(argv) == 0
    point = json.loads((out / "sweep.json").read_text())["points"][0]
    assert sorted(point) == sorted(
        [
            "label",
            "method",
            "heads",
            "storage_percent",
            "error",
            "relative_error",
            "seconds",
            "config",
        ]
    )
