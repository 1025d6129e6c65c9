"""RoutedLinear against the dense closed form, the base-model check, exact adapter bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydraopt.errors import HydraoptError
from hydraopt.runtime import ModuleFactors, SharedFactors, check_base_model, shared_factors
from hydraopt.runtime.layer import RoutedLinear, TaskRows


def factors(M: int, K: int = 4, d: int = 3, k: int = 5, r: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    routing = (torch.arange(K) * 5) % M  # reaches high head indices too
    return ModuleFactors(
        torch.randn(r, k, generator=gen), torch.randn(M, d, r, generator=gen), routing
    )


@pytest.mark.parametrize("M", [1, 2, 4, 12])
def test_each_row_gets_its_routed_dense_update(M):
    f = factors(M)
    base = nn.Linear(5, 3, bias=True)
    rows = TaskRows()
    layer = RoutedLinear(base, f, rows)
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))  # (B, T, k)
    # new tasks per row, the same ones again (the layer keeps its head selection), new ones: the
    # selection must follow every assignment
    for ids in ([3, 0, 2, 1], [3, 0, 2, 1], [1, 1, 3, 0]):
        rows.ids = torch.tensor(ids)
        got = layer(x)  # (B, T, d)
        for b, task in enumerate(ids):
            w = base.weight + f.heads[f.routing[task]] @ f.A  # (d, k) dense ΔW routed for the task
            torch.testing.assert_close(got[b], x[b] @ w.T + base.bias)


@pytest.mark.parametrize("M", [1, 2, 4, 12])
def test_a_shared_left_basis_is_applied_once_after_the_routed_cores(M):
    """With a basis U (d, R) the heads are (R, r) cores: ΔW_i = U core_i A' for every row, the
    layer holding U once (not K products U core_i)."""
    gen = torch.Generator().manual_seed(2)
    d, k, r, R, K = 6, 5, 3, 2, 4
    core = ModuleFactors(
        torch.randn(r, k, generator=gen),
        torch.randn(M, R, r, generator=gen),
        (torch.arange(K) * 5) % M,
        torch.randn(d, R, generator=gen),
    )
    assert core.shape == (d, k, r)
    base = nn.Linear(k, d, bias=True)
    rows = TaskRows()
    layer = RoutedLinear(base, core, rows)
    assert layer.basis is not None and layer.basis.shape == (d, R)
    assert layer.heads.shape == (M, R, r)
    x = torch.randn(4, 6, k, generator=torch.Generator().manual_seed(3))  # (B, T, k)
    for ids in ([3, 0, 2, 1], [1, 1, 3, 0]):
        rows.ids = torch.tensor(ids)
        got = layer(x)  # (B, T, d)
        for b, task in enumerate(ids):
            delta = core.basis @ core.heads[core.routing[task]] @ core.A  # (d, k)
            torch.testing.assert_close(got[b], x[b] @ (base.weight + delta).T + base.bias)


def test_shape_mismatch_and_missing_modules_are_refused():
    model = nn.Sequential()
    model.add_module("q", nn.Linear(5, 3))
    model.add_module("act", nn.ReLU())
    good = SharedFactors(("a",), "hub/id", {"q": factors(1, K=1)}, "lora", "ties")
    check_base_model(model, good)
    for modules, message in [
        ({"q": factors(1, K=1, d=4)}, "q is 5 -> 3, the bundle needs 5 -> 4"),
        ({"missing": factors(1, K=1)}, "has no module missing"),
        ({"act": factors(1, K=1)}, "act is a ReLU, not a linear layer"),
    ]:
        bad = SharedFactors(("a",), "hub/id", modules, "lora", "ties")
        with pytest.raises(HydraoptError, match=message):
            check_base_model(model, bad)


def test_adapter_bytes_count_a_once_and_m_heads(chat_base, chat_bundle):
    from hydraopt.runtime import load_model

    bundle_dir, _ = chat_bundle("hydraopt-m2")
    runtime = load_model(bundle_dir, chat_base)
    expected = 0
    for f in shared_factors(bundle_dir).modules.values():
        d, k, r = f.shape
        expected += 4 * (r * k + 2 * d * r) + 8 * 3  # float32 A' and 2 heads, int64 routing of K=3
    assert runtime.adapter_bytes() == expected


def test_a_shared_basis_bundle_is_held_as_u_v_once_and_k_cores(chat_base, chat_adapters, tmp_path):
    """The runtime keeps a shared_basis bundle's U and V once per module and K (R, R) cores, not
    K heads U S_i (d, R): its bytes are exactly d R + k R + K R² floats plus the routing."""
    import hydraopt
    from hydraopt.runtime import load_model

    aset = hydraopt.load_adapter_set(chat_adapters["lora"])
    bundle = hydraopt.merge_adapter_set(aset, "shared_basis", {"budget": 40.0})
    hydraopt.save_bundle(bundle, tmp_path / "bundle")
    runtime = load_model(tmp_path / "bundle", chat_base)
    K = len(bundle.tasks)
    expected = 0
    for spec in bundle.modules:
        R = bundle.merged[spec.name].rank
        expected += 4 * (spec.d * R + spec.k * R + K * R * R) + 8 * K  # float32, int64 routing
        f = runtime.factors.modules[spec.name]
        assert f.basis is not None and f.basis.shape == (spec.d, R)
        assert f.heads.shape == (K, R, R)
    assert runtime.adapter_bytes() == expected


@pytest.mark.parametrize("name", ["hydraopt-m2", "ties-m1", "vera-hydraopt-m2"])
def test_the_runtime_holds_each_adapter_tensor_once(chat_base, chat_bundle, name):
    """Every adapter tensor the runtime object reaches (its layers' buffers and its ``factors``)
    lives in the storages ``adapter_bytes`` counts: none is held a second time."""
    from hydraopt.runtime import load_model
    from hydraopt.runtime.layer import RoutedLinear

    runtime = load_model(chat_bundle(name)[0], chat_base)
    layers = [m for m in runtime.model.modules() if isinstance(m, RoutedLinear)]
    assert layers
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for f in runtime.factors.modules.values()
        for t in (f.A, f.heads, f.routing)
    }
    held.update(
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        for layer in layers
        for t in layer.buffers()
    )
    assert sum(held.values()) == runtime.adapter_bytes()


def test_vera_factors_are_as_lora_of_the_projection_slices(chat_bundle):
    from hydraopt.io.bundle import load_any_bundle

    bundle = load_any_bundle(chat_bundle("vera-hydraopt-m2")[0])
    view = shared_factors(bundle)
    vera_a, vera_b = bundle.projections
    for task in bundle.tasks:
        for spec, (lam_b, lam_d) in zip(
            bundle.modules, bundle.task_vectors(task).values(), strict=True
        ):
            f = view.modules[spec.name]
            want = (lam_b[:, None] * vera_b[: spec.d]) @ (lam_d[:, None] * vera_a[:, : spec.k])
            got = f.heads[f.routing[bundle.tasks.index(task)]] @ f.A
            torch.testing.assert_close(got, want)
