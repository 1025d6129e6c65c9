"""What the serving runtime holds for a 16-bit and an 8/4-bit bundle of the same merge.

The runtime reads every bundle through ``lora_view()`` (hydraopt.runtime.factors), and a
quantized bundle (format version 3) is dequantized when it is loaded: on disk it takes the
quantized bytes, in memory the same float32 factors as the 16-bit bundle. This script measures,
side by side in one run, per bundle dir: the file's tensor bytes, the bytes of the factors the
runtime holds (sum of the tensors' nbytes), the process's peak RSS growth while loading (each
bundle in a fresh subprocess, so one load does not hide another) and the load time.

Usage:
  python benchmarks/quantized_runtime_memory.py BUNDLE_DIR [BUNDLE_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from safetensors.torch import load_file
from hydraopt.runtime.factors import shared_factors
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
factors = shared_factors(path)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
held = sum(t.numel() * t.element_size() for f in factors.modules.values() for t in (f.A, f.heads))
stored = sum(t.numel() * t.element_size() for t in load_file(str(path / "tensors.safetensors")).values())
print(json.dumps({"stored": stored, "held": held, "rss_growth_kib": after - before,
                  "seconds": seconds}))
"""


def measure(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    args = p.parse_args()
    print(
        "| bundle | format | tensor bytes on disk | factors held by the runtime | peak RSS growth | load s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path in args.bundles:
        meta = json.loads((path / "bundle.json").read_text())
        row = measure(path)
        print(
            f"| {path.name} | v{meta['format_version']} | {row['stored']:,} | {row['held']:,} | "
            f"{row['rss_growth_kib'] / 1024:.1f} MiB | {row['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
