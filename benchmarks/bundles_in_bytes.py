"""Bundles written by the CLI, in bytes: one table row per bundle dir plus the separate adapters.

Reads each bundle dir as written by ``hydraopt merge`` (``--bits``, ``--budget``): its exact
stored bytes (the sum of ``tensors.safetensors``' tensor sizes, checked against the bundle's own
storage report), S % of the K separate adapters' 16-bit bytes and the mean hard-routed error the
bundle reports (measured after quantization). The K separate adapters quantized factor by factor
(hydraopt.quantized_bundle.separate_point) give the reference rows.

Usage:
  python benchmarks/bundles_in_bytes.py --adapters examples/adapters/en-* --bits 8 4 \
      BUNDLE_DIR [BUNDLE_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from hydraopt import load_adapter_set
from hydraopt.analysis import mean_error, relative_error
from hydraopt.io.bundle import load_any_bundle
from hydraopt.quantized_bundle import separate_point


def file_bytes(path: Path) -> int:
    tensors = load_file(str(path / "tensors.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--bits", nargs="*", type=int, default=[8, 4])
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    aset = load_adapter_set(args.adapters)
    K, n = len(aset.tasks), len(aset.modules)
    reference = 2 * sum(K * m.r * (m.d + m.k) for m in aset.modules)
    rows = []
    for b in args.bits:
        point = separate_point(aset, b, args.group_size)
        err = sum(map(sum, point.errors.values())) / (K * n)
        zero = sum(map(sum, point.zero_errors.values())) / (K * n)
        rows.append((f"separate {b}-bit", point.nbytes, err, err / zero))
    for path in args.bundles:
        bundle = load_any_bundle(path)
        stored = file_bytes(path)
        if stored != bundle.storage.bundle_bytes:
            raise SystemExit(f"{path}: storage report {bundle.storage.bundle_bytes} != {stored}")
        rows.append((path.name, stored, mean_error(bundle), relative_error(bundle)))
    print(f"K = {K}, {n} modules; reference (separate, 16-bit) = {reference:,} bytes")
    print("| system | bytes | S % of 16-bit separate | mean MAE | relative to ΔW'=0 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, nbytes, err, rel in sorted(rows, key=lambda r: r[1]):
        print(f"| {name} | {nbytes:,} | {100 * nbytes / reference:.2f} | {err:.4e} | {rel:.4f} |")


if __name__ == "__main__":
    main()
