"""The merge driver: chunk planning by hand, generators that depend only on (seed, module),
results independent of the chunking, and an M = K merge that reproduces the PEFT files' ΔW."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.engine import EngineOptions, plan_chunks, resolve_config
from hydraopt.engine_chunks import chunk_generator
from hydraopt.errors import HydraoptError
from hydraopt.types import ModuleSpec


def spec(name: str, d: int, k: int) -> ModuleSpec:
    return ModuleSpec(name=name, d=d, k=k, r=2)


def test_chunks_hold_same_shaped_modules_in_order_within_the_budget():
    mods = [spec("a", 4, 4), spec("b", 8, 4), spec("c", 4, 4), spec("d", 4, 4), spec("e", 8, 4)]
    # K = 2: a 4 x 4 module costs 32 elements, an 8 x 4 one 64; a budget of 70 fits two small
    # or one large.
    chunks = plan_chunks(mods, 2, 70)
    assert [[m.name for m in c] for c in chunks] == [["a", "c"], ["d"], ["b"], ["e"]]
    # A module larger than the budget still gets a chunk of its own.
    assert [[m.name for m in c] for c in plan_chunks(mods, 2, 1)] == [
        ["a"],
        ["c"],
        ["d"],
        ["b"],
        ["e"],
    ]
    # A per-module config splits chunks further: only modules of one config merge together.
    configs = {"a": 1, "b": 1, "c": 2, "d": 1, "e": 1}
    by_config = plan_chunks(mods, 2, 10**6, configs)
    assert [[m.name for m in c] for c in by_config] == [["a", "d"], ["b", "e"], ["c"]]


def test_chunk_generator_depends_only_on_seed_and_first_module():
    def draw(seed, name):
        return torch.rand(4, generator=chunk_generator(seed, name, "cpu"))

    assert torch.equal(draw(0, "layers.0.q"), draw(0, "layers.0.q"))
    assert not torch.equal(draw(0, "layers.0.q"), draw(0, "layers.1.q"))
    assert not torch.equal(draw(0, "layers.0.q"), draw(1, "layers.0.q"))


def test_resolve_config_refuses_a_missing_or_impossible_m():
    with pytest.raises(HydraoptError, match="needs heads = M, 1 <= M <= K = 3"):
        resolve_config("hydraopt", {}, 3)
    with pytest.raises(HydraoptError, match="heads"):
        resolve_config("hydraopt", {"heads": 4}, 3)
    config = resolve_config("hydraopt", {"heads": 2, "distance": "fro"}, 3)
    assert (config.heads, config.distance) == (2, "fro")


@pytest.fixture
def shared_a_adapters(make_adapter):
    return [make_adapter(f"t{i}", seed=i + 1, alpha=4 * (i + 1), shared_a_seed=9) for i in range(3)]


def peft_delta(path, module: str, scale: float) -> torch.Tensor:
    """ΔW = (alpha / r) B A of one module, straight from the PEFT file."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    prefix = f"base_model.model.{module}"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    return scale * b.double() @ a.double()


def test_m_equals_k_on_adapters_sharing_a_reproduces_every_peft_update(shared_a_adapters):
    aset = load_adapter_set(shared_a_adapters)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 3, "refine_steps": 0})
    for i, task in enumerate(bundle.tasks):
        factors = bundle.task_factors(task)
        for m in aset.modules:
            a, head = factors[m.name]
            want = peft_delta(shared_a_adapters[i], m.name, 4 * (i + 1) / 4)
            got = head.double() @ a.double()
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item())


def test_results_do_not_depend_on_the_chunking(make_adapter):
    paths = [make_adapter(f"t{i}", seed=i + 1) for i in range(3)]
    aset = load_adapter_set(paths)
    one_per_chunk = EngineOptions(chunk_elements=1)
    for method, options in (("ties", {}), ("hydraopt", {"heads": 2, "refine_steps": 3})):
        whole = merge_adapter_set(aset, method, options)
        split = merge_adapter_set(aset, method, options, engine=one_per_chunk)
        for m in aset.modules:
            # HydraOpt's k-means++ starts draw from the chunk's generator (seeded by its first
            # module), so only a chunk's first module sees the same draws: compare that one.
            if method == "hydraopt" and m.name != aset.modules[0].name:
                continue
            x, y = whole.merged[m.name], split.merged[m.name]
            assert torch.equal(x.A, y.A) and torch.equal(x.heads, y.heads)
            assert torch.equal(x.routing, y.routing)


def test_read_ahead_hands_over_the_chunk_read_in_a_thread():
    # iter_merged reads the next chunk in a thread while one merges: the stack read there is
    # the one handed over (once), an unrequested chunk is read in place, errors surface where
    # the chunk is used, and everything else is the adapter set's.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hydraopt.engine_chunks import _ReadAhead

    class Set:
        tasks = ("t0", "t1")

        def __init__(self):
            self.reads = []

        def load_stack(self, chunk):
            if chunk[0].name == "bad":
                raise HydraoptError("bad: truncated")
            self.reads.append((chunk[0].name, threading.current_thread().name))
            return f"stack of {chunk[0].name}"

    aset = Set()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahead") as pool:
        ahead = _ReadAhead(aset, pool)
        ahead.request([spec("b", 4, 4)])
        ahead.request([spec("bad", 4, 4)])
        assert ahead.load_stack([spec("b", 4, 4)]) == "stack of b"
        assert ahead.load_stack([spec("b", 4, 4)]) == "stack of b"  # again: read in place
        with pytest.raises(HydraoptError, match="truncated"):
            ahead.load_stack([spec("bad", 4, 4)])
    assert [name for name, _ in aset.reads] == ["b", "b"]
    assert aset.reads[0][1].startswith("ahead") and aset.reads[1][1] == "MainThread"
    assert ahead.tasks == ("t0", "t1")
