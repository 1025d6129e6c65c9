"""The Ray engine gives the same bundle as the local one (local Ray instance, 2 CPUs)."""

from __future__ import annotations

import pytest
import torch

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.engine import EngineOptions

ray = pytest.importorskip("ray", reason="the 'scale' extra (ray) is not installed")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module (the engine leaves a running one alone)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "method, options",
    [
        ("hydraopt", {"heads": 2, "refine_steps": 20}),
        ("dare_ties", {"density": 0.4}),
        ("shared_basis", {"budget": 40.0}),  # two passes: rank curves, then chunks per rank
    ],
)
def test_ray_engine_bundle_equals_local(make_adapter, method, options):
    paths = [make_adapter(f"t{i}", seed=i + 1) for i in range(4)]
    aset = load_adapter_set(paths)
    # small chunks: several Ray tasks, and the same chunking for both engines
    base = {"seed": 3, "chunk_elements": 4 * 16 * 16}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray tasks run one thread; match it so float sums are identical
    try:
        local = merge_adapter_set(aset, method, options, engine=EngineOptions(**base))
    finally:
        torch.set_num_threads(threads)
    remote = merge_adapter_set(
        aset, method, options, engine=EngineOptions(**base, engine="ray", ray_cpus=2)
    )
    assert list(remote.merged) == list(local.merged)
    for name, m in local.merged.items():
        a, heads, routing = m.A, m.heads, m.routing
        m2 = remote.merged[name]
        a2, h2, r2 = m2.A, m2.heads, m2.routing
        assert torch.equal(routing, r2), name
        assert torch.equal(a, a2) and torch.equal(heads, h2), name
    assert remote.storage == local.storage
    assert remote.extra["errors"] == local.extra["errors"]
