"""The benchmark scripts (benchmarks/synthetic.py, reference.py, speed.py) on tiny configurations.

So that the benchmarks cannot rot: the synthetic adapters are real PEFT dirs of the requested
shapes, the paper-code reference is a real optimiser (it recovers adapters that share A), and the
suite's quick mode writes the JSON the results are read from. Nothing here asserts a time.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is a folder of scripts, not a package

import precision_path  # noqa: E402
import reference  # noqa: E402
import side_by_side  # noqa: E402
import speed  # noqa: E402
import synthetic  # noqa: E402

from hydraopt import load_adapter_set, merge_adapter_set  # noqa: E402
from hydraopt.analysis import mean_error  # noqa: E402
from hydraopt.devices import fast_bfloat16  # noqa: E402

TINY = synthetic.ModelShape("tiny", hidden=16, kv=8, layers=2, base_model="tiny/base")


def test_synthetic_adapters_load_with_the_requested_shapes(tmp_path):
    spec = synthetic.SyntheticSpec(TINY, rank=4, alpha=8)
    dirs = synthetic.ensure_adapters(spec, 3, tmp_path)
    aset = load_adapter_set(dirs)
    assert aset.tasks == ("task-0000", "task-0001", "task-0002")
    assert aset.base_model == "tiny/base"
    shapes = {m.name.rsplit(".", 1)[1]: (m.d, m.k, m.r) for m in aset.modules}
    assert len(aset.modules) == 2 * 4
    assert shapes == {
        "q_proj": (16, 16, 4),
        "k_proj": (8, 16, 4),
        "v_proj": (8, 16, 4),
        "o_proj": (16, 16, 4),
    }
    assert {s for per_task in aset.scales.values() for s in per_task.values()} == {2.0}
    # The structure HydraOpt relies on: A's alike across tasks, B's not.
    stack = aset.load_stack([aset.modules[0]])
    assert relative_spread(stack.A[0]) < 0.2 < relative_spread(stack.B[0])


def relative_spread(factors: torch.Tensor) -> float:
    """||X_i - mean X|| / ||mean X|| over the task axis (0)."""
    mean = factors.mean(0)
    return float((factors - mean).norm() / mean.norm())


def test_synthetic_cache_is_incremental_and_independent_of_k(tmp_path):
    spec = synthetic.SyntheticSpec(TINY, rank=4, alpha=8)
    first = synthetic.ensure_adapters(spec, 1, tmp_path / "a")[0] / "adapter_model.safetensors"
    stamp = first.stat().st_mtime_ns
    more = synthetic.ensure_adapters(spec, 3, tmp_path / "a")
    assert first.stat().st_mtime_ns == stamp  # complete dirs are not rewritten
    alone = synthetic.ensure_adapters(spec, 3, tmp_path / "b")
    assert [(d / "adapter_model.safetensors").read_bytes() for d in more] == [
        (d / "adapter_model.safetensors").read_bytes() for d in alone
    ]


def test_reference_recovers_adapters_that_share_a(tmp_path):
    """M = K on adapters with one exact A: a zero-error solution exists; the paper code nears it."""
    spec = synthetic.SyntheticSpec(TINY, rank=4, alpha=8, layers=1, drift_scale=0.0)
    aset = load_adapter_set(synthetic.ensure_adapters(spec, 3, tmp_path))
    ours = merge_adapter_set(aset, "hydraopt", {"heads": 3})
    zero = mean_error(ours, "zero_errors")
    merged = reference.reference_merge(aset, 3, epochs=300)
    ref = reference.merged_error(aset, merged)
    # AdamW at lr 0.01 rattles at a few % of the update's size (its steps do not shrink);
    # starting from B' = 0 it begins at exactly the zero error.
    assert ref < 0.1 * zero
    assert mean_error(ours) < 1e-3 * zero
    for m in aset.modules:
        a, heads, routing = merged[m.name]
        assert a.shape == (m.r, m.k) and heads.shape == (3, m.d, m.r)
        assert routing.tolist() == [0, 1, 2]


def test_reference_soft_routing_runs_and_routes_every_task(tmp_path):
    spec = synthetic.SyntheticSpec(TINY, rank=4, alpha=8, layers=1)
    aset = load_adapter_set(synthetic.ensure_adapters(spec, 3, tmp_path))
    merged = reference.reference_merge(aset, 2, epochs=5)
    for _a, heads, routing in merged.values():
        assert heads.shape[0] == 2 and routing.shape == (3,) and int(routing.max()) <= 1
    assert reference.reference_epoch_seconds(aset, 2, epochs_timed=1) > 0


def test_heads_for_expands_k_and_drops_impossible_values():
    assert speed.heads_for(["1", "2", "K"], 5) == [1, 2, 5]
    assert speed.heads_for(["1", "2", "K"], 1) == [1]


def quick_suite(tmp_path: Path, *argv: str) -> dict:
    """speed.py --quick at SmolLM2 shape into tmp_path/out; torch's thread count restored."""
    torch_threads = torch.get_num_threads()
    try:
        return speed.main(
            ["--quick", "--shapes", "smollm2-135m", *argv]
            + ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
        )
    finally:
        torch.set_num_threads(torch_threads)


def test_quick_suite_writes_the_expected_json(tmp_path):
    result = quick_suite(tmp_path, "--heads", "1", "K", "--ref-epochs", "20")
    on_disk = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert "| smollm2-135m | 5 | 5 |" in (tmp_path / "out" / "speed.md").read_text()
    assert {"machine", "torch_threads", "commit", "device", "runs", "reference"} <= set(on_disk)
    # What the speed depends on besides the code (issue 22): the CPU's kernels and the path.
    assert on_disk["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert on_disk["fast_bfloat16"] == fast_bfloat16(torch.device("cpu"))
    auto = "bfloat16" if on_disk["fast_bfloat16"] else "float32"
    assert on_disk["auto_precision"] == on_disk["precision_path"] == auto
    assert {r["precision_path"] for r in on_disk["runs"]} == {auto}
    assert [(r["shape"], r["tasks"], r["heads"], r["status"]) for r in on_disk["runs"]] == [
        ("smollm2-135m", 5, 1, "ok"),
        ("smollm2-135m", 5, 5, "ok"),
    ]
    run_keys = {"seconds", "wall_seconds", "mae", "peak_rss_bytes", "adapter_bytes", "disk_bytes"}
    for run in on_disk["runs"]:
        assert run_keys <= set(run)
        assert run["peak_rss_bytes"] > 0 and run["rss_over_adapters"] > 0
    ref_keys = {
        "ref_seconds_per_epoch",
        "ref_seconds_1000_whole",
        "ref_mae",
        "ours_slice_mae",
        "time_ratio_slice",
        "time_ratio_whole",
        "mae_ratio",
    }
    assert [r["heads"] for r in on_disk["reference"]] == [1, 5]
    for row in on_disk["reference"]:
        assert ref_keys <= set(row)
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ref_keys)


def test_suite_runs_the_float32_path_when_asked(tmp_path):
    result = quick_suite(
        tmp_path, "--heads", "1", "--ref-epochs", "0", "--refine-precision", "float32"
    )
    assert result["precision_path"] == "float32" and result["refine_precision"] == "float32"
    assert [r["precision_path"] for r in result["runs"]] == ["float32"]
    assert "Refinement products in float32" in (tmp_path / "out" / "speed.md").read_text()


def test_side_by_side_times_each_precision_path_after_one_reference_timing(tmp_path):
    spec = synthetic.SyntheticSpec(TINY, rank=4, alpha=8, layers=1)
    dirs = synthetic.ensure_adapters(spec, 3, tmp_path / "adapters")
    torch_threads = torch.get_num_threads()
    try:
        record = side_by_side.main(
            [*map(str, dirs), "--heads", "1", "--repeats", "1", "--epochs", "1", "--threads", "1"]
            + ["--refine-precision", "bfloat16", "float32", "--json", str(tmp_path / "r.json")]
        )
    finally:
        torch.set_num_threads(torch_threads)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(record))
    rows = record["rows"]
    assert [(r["heads"], r["precision_path"]) for r in rows] == [(1, "bfloat16"), (1, "float32")]
    assert rows[0]["reference_seconds"] == rows[1]["reference_seconds"]  # one timing, both paths
    for row in rows:
        assert row["ratio"] == pytest.approx(row["reference_seconds"] / row["ours_seconds"])
    # float32 takes its own schedule, so its error is its own (same start, both refined).
    assert rows[0]["ours_mae"] != rows[1]["ours_mae"]
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_precision_path_resolves_like_the_merge():
    assert precision_path.precision_path("float32") == "float32"
    assert precision_path.precision_path("bfloat16") == "bfloat16"
    fast = fast_bfloat16(torch.device("cpu"))
    assert precision_path.precision_path("auto") == ("bfloat16" if fast else "float32")
    record = precision_path.cpu_record()
    assert "fast bfloat16" in precision_path.describe(record)


def test_a_childs_peak_rss_is_its_own_not_its_parents():
    """ru_maxrss inherits the parent's high-water mark across fork + exec; the suite's children
    must report their own peak, or every run after a reference run reports the parent's."""
    import subprocess

    ballast = bytearray(700 * 2**20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touch every page
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import speed; "
    code += "print(speed.peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout) < len(ballast)
    del ballast


def test_reference_can_be_timed_without_its_long_run(tmp_path):
    """--ref-epochs 0: the reference's epochs are timed (the time ratios), its 1000-epoch run
    and MAE are skipped, and the tables say so instead of failing."""
    result = quick_suite(tmp_path, "--heads", "1", "--ref-epochs", "0")
    (row,) = result["reference"]
    assert row["ref_mae"] is None and row["mae_ratio"] is None and row["ref_run_seconds"] is None
    assert math.isfinite(row["time_ratio_whole"]) and row["time_ratio_whole"] > 0
    assert "| - (0) |" in (tmp_path / "out" / "speed.md").read_text()


@pytest.mark.parametrize("name", sorted(synthetic.SHAPES))
def test_named_shapes_have_the_published_attention_sizes(name):
    spec = synthetic.SyntheticSpec(synthetic.SHAPES[name])
    per_layer = {m.rsplit(".", 1)[1]: (d, k) for m, d, k in spec.modules()[:4]}
    hidden, kv = per_layer["q_proj"][0], per_layer["k_proj"][0]
    assert per_layer == {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
    }
    assert (hidden, kv, spec.num_layers) == {
        "smollm2-135m": (576, 192, 30),
        "llama-3.2-1b": (2048, 512, 16),
        "llama-3.2-3b": (3072, 1024, 28),
    }[name]


def test_peers_vlora_storage_and_error_are_exact_on_tiny_adapters(tmp_path):
    """benchmarks/peers.py: vlora-dev's storage count, its error, and the PEFT export."""
    import peers

    spec = synthetic.SyntheticSpec(TINY, rank=4, alpha=8)
    dirs = synthetic.ensure_adapters(spec, 3, tmp_path / "adapters")
    # fp16 on disk, as PEFT saves: vlora-dev itself cannot SVD these; the script upcasts.
    aset = load_adapter_set(dirs)
    points = peers.vlora_points(aset, tmp_path / "export")
    assert [p["label"] for p in points] == ["vlora n=1", "vlora n=2"]
    # Per module: mean + n components for A and B, 2 n loadings per task (K = 3).
    full = sum(3 * m.r * (m.d + m.k) for m in aset.modules)
    for n, p in enumerate(points, start=1):
        kept = sum((1 + n) * m.r * (m.d + m.k) + 3 * 2 * n for m in aset.modules)
        assert p["storage_percent"] == pytest.approx(100 * kept / full)
    assert points[-1]["mae"] < 1e-6  # n = K - 1 reproduces every adapter
    assert points[0]["mae"] > 10 * points[-1]["mae"]
    exported = load_adapter_set(sorted((tmp_path / "export" / "n2").iterdir()))
    stack, original = exported.load_stack(exported.modules[:1]), aset.load_stack(aset.modules[:1])
    assert torch.allclose(stack.delta(), original.delta(), atol=1e-3)


def test_memory_estimate_stops_growing_once_the_solver_samples_tasks():
    """Past refine_tasks adapters the targets stay factors: K = 500 must not be skipped for a
    (K, d, k) working set the solver never forms."""
    shapes = [(2048, 2048), (512, 2048)]
    dense = speed.DENSE_COPIES * 4 * 2048 * 2048
    assert speed.estimate_peak_bytes(shapes, 5) == 5 * dense
    assert speed.estimate_peak_bytes(shapes, 8) == 8 * dense
    assert (
        speed.estimate_peak_bytes(shapes, 9) == speed.estimate_peak_bytes(shapes, 500) == 8 * dense
    )
