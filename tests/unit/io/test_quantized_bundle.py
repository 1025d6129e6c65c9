"""Bundle format version 3: quantized factors stored as codes + scales, read back dequantized.

Checked against independent computations: the loaded factors equal quantize.dequantize of the
16-bit factors, the stored bytes equal the sum of the safetensors' tensor sizes and the
quantize.quantized_nbytes formula, and the errors a quantized bundle reports equal the mean
absolute error recomputed by hand from the adapters' own A, B and scale.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraopt import load_adapter_set, load_bundle, merge_adapter_set, save_bundle
from hydraopt.errors import HydraoptError
from hydraopt.io import container
from hydraopt.io.bundle import META_NAME, TENSORS_NAME, load_any_bundle
from hydraopt.quantize import dequantize, quantize, quantized_nbytes
from hydraopt.quantized_bundle import quantize_bundle, quantize_merged


@pytest.fixture
def aset(make_adapter):
    return load_adapter_set(
        [make_adapter(f"t{i}", seed=i + 1, alpha=8 * (i + 1)) for i in range(3)]
    )


@pytest.fixture
def merged(aset):
    return merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 3})


def file_tensor_bytes(path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_equals_dequantize_of_the_16_bit_factors(aset, merged, bits, tmp_path):
    q = quantize_merged(merged, aset, bits, 16)
    save_bundle(q, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    for name, m in merged.merged.items():
        for got, orig in ((back.merged[name].A, m.A), (back.merged[name].heads, m.heads)):
            want = dequantize(quantize(orig.to(torch.float16), bits, 16))
            assert torch.equal(got, want)
        assert torch.equal(back.merged[name].routing, m.routing)
    meta = json.loads((tmp_path / "b" / META_NAME).read_text())
    assert meta["format_version"] == 3
    first = f"{merged.modules[0].name}.A"
    assert meta["quantization"][first] == {
        "bits": bits,
        "group_size": 16,
        "shape": list(merged.merged[merged.modules[0].name].A.shape),
        "dtype": "float16",
    }
    assert back.provenance.errors == q.provenance.errors
    save_bundle(back, tmp_path / "again")  # a loaded quantized bundle re-saves bit for bit
    for name in (TENSORS_NAME, META_NAME):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_storage_bytes_are_what_the_file_holds(aset, merged, bits, tmp_path):
    q = quantize_merged(merged, aset, bits, 16)
    save_bundle(q, tmp_path / "b")
    stored = file_tensor_bytes(tmp_path / "b" / TENSORS_NAME)
    assert q.storage.bundle_bytes == stored
    if bits != 16:  # and the formula, tensor by tensor
        formula = sum(
            quantized_nbytes(t.numel(), bits, 16)
            for m in merged.merged.values()
            for t in (m.A, m.heads)
        )
        assert stored == formula
    reference = 2 * sum(3 * m.r * (m.d + m.k) for m in aset.modules)
    assert q.storage.adapters_bytes == reference
    assert q.storage.storage_percent == pytest.approx(100 * stored / reference)


def test_errors_are_measured_after_quantization(aset, merged, tmp_path):
    q = quantize_merged(merged, aset, 4, 16)
    save_bundle(q, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        m = back.merged[spec.name]
        for i in range(len(aset.tasks)):
            target = stack.scale[0, i] * (stack.B[0, i] @ stack.A[0, i])  # (d, k)
            approx = m.heads[int(m.routing[i])] @ m.A
            want = float((target - approx).abs().mean())
            assert back.provenance.errors[spec.name][i] == pytest.approx(want, rel=1e-5)
    assert q.provenance.errors != merged.provenance.errors
    assert q.provenance.zero_errors == merged.provenance.zero_errors


def test_sixteen_bits_is_the_bundle_unchanged(aset, merged, tmp_path):
    assert quantize_bundle(merged, 16) is merged
    assert quantize_merged(merged, aset, 16) is merged
    save_bundle(merged, tmp_path / "b")
    assert json.loads((tmp_path / "b" / META_NAME).read_text())["format_version"] == 1
    assert "quantization" not in json.loads((tmp_path / "b" / META_NAME).read_text())


def test_bad_arguments_are_refused(merged):
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_bundle(merged, 3)
    with pytest.raises(ValueError, match="even"):
        quantize_bundle(merged, 4, 7)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_bundle(quantize_bundle(merged, 8), 4)


def test_an_older_reader_refuses_version_3_in_one_line(aset, merged, tmp_path, monkeypatch):
    save_bundle(quantize_merged(merged, aset, 4), tmp_path / "b")
    monkeypatch.setattr(container, "NEWEST_FORMAT_VERSION", 2)
    with pytest.raises(HydraoptError, match="bundle format 3 is newer than this hydraopt") as e:
        load_bundle(tmp_path / "b")
    assert "\n" not in str(e.value)


def _corrupt(path, tensors=None, meta=None) -> None:
    """Apply ``tensors(dict)`` / ``meta(dict)`` edits to the bundle dir ``path`` in place."""
    if tensors is not None:
        stored = load_file(str(path / TENSORS_NAME))
        tensors(stored)
        save_file(stored, str(path / TENSORS_NAME))
    if meta is not None:
        data = json.loads((path / META_NAME).read_text())
        meta(data)
        (path / META_NAME).write_text(json.dumps(data))


A0 = "model.layers.0.self_attn.q_proj.A"


def _entry(m):
    return m["quantization"][next(iter(m["quantization"]))]


CORRUPTIONS = {
    "codes cut": (
        dict(tensors=lambda t: t.update({A0 + "#codes": t[A0 + "#codes"][:-1]})),
        "codes must be",
    ),
    "codes int8": (
        dict(tensors=lambda t: t.update({A0 + "#codes": t[A0 + "#codes"].to(torch.int8)})),
        "codes must be",
    ),
    "scales float32": (
        dict(tensors=lambda t: t.update({A0 + "#scales": t[A0 + "#scales"].float()})),
        "scales must be",
    ),
    "scales nan": (
        dict(tensors=lambda t: t[A0 + "#scales"].__setitem__(0, float("nan"))),
        "finite",
    ),
    "scale negative": (dict(tensors=lambda t: t[A0 + "#scales"].__setitem__(0, -1.0)), ">= 0"),
    "scales missing": (dict(tensors=lambda t: t.pop(A0 + "#scales")), "has no"),
    "stray piece": (
        dict(tensors=lambda t: t.update({"x#codes": torch.zeros(2, dtype=torch.uint8)})),
        "belongs to no",
    ),
    "plain and quantized": (
        dict(tensors=lambda t: t.update({A0: torch.zeros(1)})),
        "both plain and",
    ),
    "bits 3": (dict(meta=lambda m: _entry(m).update(bits=3)), "bits must be"),
    "bits bool": (dict(meta=lambda m: _entry(m).update(bits=True)), "bits must be"),
    "group odd": (dict(meta=lambda m: _entry(m).update(group_size=15)), "even"),
    "shape bad": (dict(meta=lambda m: _entry(m).update(shape=[0, 4])), "shape must be"),
    "dtype bad": (dict(meta=lambda m: _entry(m).update(dtype="int4")), "dtype must be"),
    "slices uneven": (dict(meta=lambda m: _entry(m).update(slices=7)), "equal slices"),
    "slices bool": (dict(meta=lambda m: _entry(m).update(slices=True)), "slices must be"),
    "no table": (dict(meta=lambda m: m.pop("quantization")), "needs a non-empty"),
    "version 1 with table": (dict(meta=lambda m: m.update(format_version=1)), "hold no quantized"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_version_3_bundles_are_refused_in_one_line(aset, merged, tmp_path, case):
    save_bundle(quantize_merged(merged, aset, 4, 16), tmp_path / "b")
    edits, message = CORRUPTIONS[case]
    _corrupt(tmp_path / "b", **edits)
    with pytest.raises(HydraoptError, match=message) as e:
        load_any_bundle(tmp_path / "b")
    assert "\n" not in str(e.value)


def test_a_shape_that_disagrees_with_modules_is_refused(aset, merged, tmp_path):
    save_bundle(quantize_merged(merged, aset, 8, 16), tmp_path / "b")

    def swap(m):
        entry = m["quantization"][A0]
        entry["shape"] = entry["shape"][::-1]  # same numel: the codes still fit

    _corrupt(tmp_path / "b", meta=swap)
    with pytest.raises(HydraoptError, match="bundle.json implies"):
        load_any_bundle(tmp_path / "b")


def test_a_16_bit_bundle_with_stray_codes_is_refused(merged, tmp_path):
    save_bundle(merged, tmp_path / "b")
    _corrupt(
        tmp_path / "b",
        tensors=lambda t: t.update({A0 + "#codes": torch.zeros(2, dtype=torch.uint8)}),
    )
    with pytest.raises(HydraoptError, match="hold no quantized tensors"):
        load_bundle(tmp_path / "b")


def test_sliced_tensors_round_trip_through_the_container():
    """A tensor quantized with groups restarting per task (``slices``) is written with its slice
    count and read back to the same codes, scales and values; one without keeps the old entry."""
    from hydraopt.io.quantized import decode_quantized, encode_quantized
    from hydraopt.quantize import dequantize, quantize

    cores = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(0))
    tensors = {"m.cores": cores, "m.U": torch.randn(8, 5)}
    quantized = {
        "m.cores": quantize(cores, 4, 16, slices=3),
        "m.U": quantize(tensors["m.U"], 4, 16),
    }
    stored, table = encode_quantized(tensors, quantized, "float16")
    assert table["m.cores"]["slices"] == 3 and "slices" not in table["m.U"]
    meta = {"format_version": 3, "quantization": table}
    values, back = decode_quantized(stored, meta, "here")
    for name, q in quantized.items():
        assert back[name].slices == q.slices
        assert torch.equal(back[name].codes, q.codes) and torch.equal(back[name].scales, q.scales)
        assert torch.equal(values[name], dequantize(q))
