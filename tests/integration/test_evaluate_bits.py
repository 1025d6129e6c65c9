"""``evaluate --merge-from --bits``: each merge evaluated at every bit width, bytes in S %."""

from __future__ import annotations

import json

import hydraopt.eval.harness as harness
import hydraopt.sweep
from hydraopt.cli.main import main


def test_evaluate_merges_once_and_scores_every_bit_width(
    base_model, adapters_root, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(harness, "load_base_model", lambda *a, **k: base_model)
    calls = {"merge": 0}
    real_merge = hydraopt.sweep.merge_adapter_set

    def counting_merge(*args, **kwargs):
        calls["merge"] += 1
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(hydraopt.sweep, "merge_adapter_set", counting_merge)
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--tasks", "en-qa", "en-gc", "--merge-from", str(adapters_root),
        "--methods", "task_arithmetic", "--heads", "--bits", "16", "4", "--group-size", "32",
        "--limit", "1", "--max-new-tokens", "2", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert calls["merge"] == 1  # one merge, stored at both widths
    systems = json.loads((out / "results.json").read_text())["systems"]
    by_label = {s["label"]: s for s in systems}
    assert {"task_arithmetic", "task_arithmetic 4-bit"} <= set(by_label)
    meta = json.loads((out / "bundles" / "task_arithmetic_4-bit" / "bundle.json").read_text())
    assert meta["format_version"] == 3
    assert by_label["task_arithmetic 4-bit"]["storage_percent"] < 0.3 * 50
    # The separate adapters at 4 bits, group 32: 4 + 16/32 bits per value of 16, exactly.
    separate = by_label["LoRA 4-bit"]
    assert separate["storage_percent"] == 100.0 * 4.5 / 16
    assert (separate["bits"], separate["group_size"], separate["kind"]) == (4, 32, "lora-quantized")
    assert [s["label"] for s in systems][:3] == ["zero-shot", "LoRA", "LoRA 4-bit"]


def test_evaluate_refuses_bad_bits_before_loading_the_model(
    adapters_root, tmp_path, monkeypatch, capsys
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad command")

    monkeypatch.setattr(harness, "load_base_model", no_model)
    argv = ["evaluate", "--tasks", "en-qa", "--merge-from", str(adapters_root), "--out"]
    for flags, message in ((["--bits", "2"], "--bits must be"), (["--group-size", "5"], "even")):
        assert main([*argv, str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
