"""Budget mode: per-module M (and bits) chosen under a byte budget, respected to the byte."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from hydraopt import load_adapter_set, merge_adapter_set, save_bundle
from hydraopt.budget_merge import budget_bytes, merge_to_budget
from hydraopt.cli.main import main
from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import load_bundle

FAST = {"refine_steps": 2}


@pytest.fixture
def adapter_dirs(make_adapter, tmp_path):
    return [str(make_adapter(f"t{i}", seed=i + 1, parent=tmp_path / "in")) for i in range(3)]


@pytest.fixture
def aset(adapter_dirs):
    return load_adapter_set(adapter_dirs)


@pytest.mark.parametrize(
    ("percent", "bits"), [(50.0, (16,)), (12.0, (16, 8, 4)), (20.0, (16, 8, 4))]
)
def test_budget_is_respected_to_the_byte(aset, tmp_path, percent, bits):
    bundle, choice = merge_to_budget(aset, percent, options=FAST, bits=bits, group_size=16)
    reference = 2 * sum(3 * m.r * (m.d + m.k) for m in aset.modules)
    assert choice.budget_bytes == budget_bytes(aset, percent) == int(percent / 100 * reference)
    assert choice.nbytes <= choice.budget_bytes
    save_bundle(bundle, tmp_path / "b")
    stored = load_file(str(tmp_path / "b" / "tensors.safetensors"))
    assert sum(t.numel() * t.element_size() for t in stored.values()) == choice.nbytes
    assert bundle.storage.bundle_bytes == choice.nbytes
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert {m["name"]: m["heads"] for m in meta["modules"]} == choice.heads
    for name, width in choice.bits.items():
        entry = meta.get("quantization", {}).get(f"{name}.A")
        assert (entry["bits"] if entry else 16) == width
    back = load_bundle(tmp_path / "b")
    total = sum(sum(row) for row in back.provenance.errors.values())
    assert total == pytest.approx(choice.error, rel=1e-6)


def test_a_full_budget_at_16_bits_takes_m_equal_k_everywhere(aset):
    bundle, choice = merge_to_budget(aset, 100.0, options=FAST, bits=(16,))
    assert set(choice.heads.values()) == {3} and set(choice.bits.values()) == {16}
    uniform = merge_adapter_set(aset, "hydraopt", {"heads": 3, **FAST})
    for name, m in bundle.merged.items():
        assert m.A.equal(uniform.merged[name].A) and m.heads.equal(uniform.merged[name].heads)


def test_budget_below_the_smallest_bundle_is_refused(aset):
    with pytest.raises(HydraoptError, match="below the smallest bundle") as e:
        merge_to_budget(aset, 1.0, options=FAST, bits=(16,))
    assert "\n" not in str(e.value)
    with pytest.raises(HydraoptError, match="percentage"):
        merge_to_budget(aset, 0.0, options=FAST)


def test_cli_budget_auto(adapter_dirs, tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["merge", *adapter_dirs, "--budget", "15", "--bits", "auto", "--group-size", "16"]
    assert main([*argv, "--refine-steps", "2", "--out", str(out)]) == 0
    assert "budget 15% = " in capsys.readouterr().out
    bundle = load_bundle(out)
    assert bundle.storage.bundle_bytes <= int(0.15 * bundle.storage.adapters_bytes)
    assert bundle.config["budget"] == 15.0 and bundle.config["bits"] == [16, 8, 4]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bits", "auto", "--heads", "1"], "--bits auto picks a width per module"),
        (["--budget", "20", "--heads", "1"], "leave out --heads"),
        (["--budget", "1"], "below the smallest bundle"),
        (["--budget", "120"], "percentage in (0, 100]"),
    ],
)
def test_cli_budget_errors_are_one_line(adapter_dirs, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert main(["merge", *adapter_dirs, "--out", str(out), "--refine-steps", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_max_error_dual_meets_the_target(aset):
    from hydraopt.analysis import mean_error

    uniform = merge_adapter_set(aset, "hydraopt", {"heads": 2, **FAST})
    target = mean_error(uniform)
    bundle, choice = merge_to_budget(aset, None, max_error=target, options=FAST, bits=(16, 8, 4))
    assert mean_error(bundle) <= target * (1 + 1e-6)
    assert choice.nbytes == bundle.storage.bundle_bytes
    with pytest.raises(HydraoptError, match="below the least mean error"):
        merge_to_budget(aset, None, max_error=0.0, options=FAST)
    with pytest.raises(HydraoptError, match="exactly one"):
        merge_to_budget(aset, 50.0, max_error=1.0, options=FAST)
