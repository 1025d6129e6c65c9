"""benchmarks/vera_shared_side.py on a tiny configuration, so the measurement script cannot rot.

The toy VeRAs are trained by real PEFT; the rows must carry the exact storage of each side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is a folder of scripts, not a package

import vera_shared_side  # noqa: E402

from hydraopt import load_adapter_set  # noqa: E402


def test_toy_veras_train_and_both_sides_are_measured(tmp_path):
    dirs = vera_shared_side.train_toy_veras(tmp_path, tasks=2, steps=3, rank=4, seed=0)
    aset = load_adapter_set(dirs)
    # λb moved from PEFT's zero init: the toy adapters are trained, not initial.
    stack = aset.load_stack([aset.modules[0]])
    assert float(stack.lambda_b.abs().max()) > 0
    rows = vera_shared_side.measure(aset, distance="mae", refine_steps=2, seed=0)
    hydra = {(r["heads"], r["shared"]): r for r in rows if r["method"] == "hydraopt"}
    assert set(hydra) == {(m, s) for m in (1, 2) for s in ("lambda_d", "lambda_b")}
    d = sum(m.d for m in aset.modules)
    r = sum(m.r for m in aset.modules)
    assert hydra[2, "lambda_d"]["storage_percent"] == pytest.approx(
        100 * (2 * d + r) / (2 * (d + r))
    )
    assert hydra[2, "lambda_b"]["storage_percent"] == pytest.approx(
        100 * (d + 2 * r) / (2 * (d + r))
    )
    assert "shared λd has the lower error" in vera_shared_side.markdown(rows, "mae", ["a", "b"])
