"""VeRA bundles at 8/4 bits: the λ rows are quantized, the shared projections stay float32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hydraopt import load_adapter_set, merge_adapter_set, save_bundle
from hydraopt.io.bundle import TENSORS_NAME, load_any_bundle
from hydraopt.quantize import dequantize, quantize, quantized_nbytes
from hydraopt.quantized_bundle import quantize_merged


@pytest.mark.parametrize("bits", [8, 4])
def test_vera_lambdas_quantized_projections_kept(make_vera_adapter, tmp_path, bits):
    aset = load_adapter_set([make_vera_adapter(f"t{i}", seed=i) for i in range(3)])
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 3})
    q = quantize_merged(bundle, aset, bits, 8)
    save_bundle(q, tmp_path / "b")
    back = load_any_bundle(tmp_path / "b")
    for got, orig in zip(back.projections, bundle.projections, strict=True):
        assert torch.equal(got, orig.float())  # bit-equal to the training projections
    for name, m in bundle.merged.items():
        for got, orig in (
            (back.merged[name].lambda_b, m.lambda_b),
            (back.merged[name].lambda_d, m.lambda_d),
        ):
            assert torch.equal(got, dequantize(quantize(orig.to(torch.float16), bits, 8)))
    stored = load_file(str(tmp_path / "b" / TENSORS_NAME))
    counted = sum(
        t.numel() * t.element_size() for n, t in stored.items() if not n.startswith("vera_")
    )
    formula = sum(
        quantized_nbytes(t.numel(), bits, 8)
        for m in bundle.merged.values()
        for t in (m.lambda_b, m.lambda_d)
    )
    assert q.storage.bundle_bytes == counted == formula
    # The errors it reports are those of the quantized λ, recomputed here through lora_view.
    view = back.lora_view()
    for spec in aset.modules:
        delta = aset.load_stack([spec]).delta()[0]  # (K, d, k)
        a, heads, routing = view[spec.name]
        want = [float((delta[i] - heads[int(routing[i])] @ a).abs().mean()) for i in range(3)]
        assert back.provenance.errors[spec.name] == pytest.approx(want, rel=1e-5)
