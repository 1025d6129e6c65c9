"""HydraOpt method: invariants, solvers, distances."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_stack

from hydraopt.errors import HydraoptError
from hydraopt.merge.base import MergeContext
from hydraopt.merge.distances import cos, fro, mae, mse
from hydraopt.merge.hydraopt import HydraOptConfig
from hydraopt.merge.measure import hard_routed_error
from hydraopt.merge.paper import init_params, paper_solve
from hydraopt.merge.refine import refine, refine_measured
from hydraopt.merge.registry import get_method

CTX = MergeContext(num_tasks=3, num_factor_tensors=8)


@pytest.mark.parametrize("distance", ["mae", "mse", "fro", "cos"])
def test_m_equals_k_reproduces_adapters_sharing_a(distance):
    stack = random_stack(G=2, K=3, d=6, k=5, r=2, shared_a=True)
    out = get_method("hydraopt").merge(
        stack, HydraOptConfig(heads=3, distance=distance), generator=torch.Generator(), context=CTX
    )
    assert torch.allclose(out.delta(), stack.delta(), atol=1e-6)
    assert out.routing.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_heads_out_of_range_are_refused():
    stack = random_stack(K=3)
    with pytest.raises(HydraoptError, match="exceeds"):
        get_method("hydraopt").merge(
            stack, HydraOptConfig(heads=4), generator=torch.Generator(), context=CTX
        )
    with pytest.raises(HydraoptError):
        HydraOptConfig(heads=0)
    with pytest.raises(HydraoptError):
        HydraOptConfig(heads=1, distance="l3")  # type: ignore[arg-type]


def test_distances_by_hand():
    t = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    a = torch.tensor([[0.0, -2.0], [1.0, 1.0]])
    # residual [[1, 0], [-1, 2]]
    assert mae(t, a).item() == pytest.approx((1 + 0 + 1 + 2) / 4)
    assert mse(t, a).item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    assert fro(t, a).item() == pytest.approx(math.sqrt(6))
    # <t, a> = 0 + 4 + 0 + 3 = 7, |t| = sqrt(14), |a| = sqrt(6)
    assert cos(t, a).item() == pytest.approx(1 - 7 / math.sqrt(14 * 6))
    assert cos(t, 2 * t).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", ["mae", "mse", "fro"])
def test_separable_forms_equal_the_distances(name):
    """The in-place reductions of E alone (measure.py's blocked path) equal the plain formulas."""
    from hydraopt.merge.distances import SEPARABLE, get_distance

    gen = torch.Generator().manual_seed(4)
    t, a = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen)
    want = get_distance(name)(t, a)  # (2, 3)
    assert torch.allclose(SEPARABLE[name](a - t, 5 * 4), want, rtol=1e-6)
    assert set(SEPARABLE) == {"mae", "mse", "fro"}  # cos needs both norms: not separable


@pytest.mark.parametrize("distance", ["mae", "fro", "cos"])
def test_refinement_never_worsens_the_hard_routed_error(distance):
    stack = random_stack(G=3, K=4, d=8, k=7, r=2, seed=11)
    cfg0 = HydraOptConfig(heads=2, distance=distance, refine_steps=0)
    cfg = HydraOptConfig(heads=2, distance=distance, refine_steps=60)
    m = get_method("hydraopt")
    start = m.merge(stack, cfg0, generator=torch.Generator().manual_seed(0), context=CTX)
    done = m.merge(stack, cfg, generator=torch.Generator().manual_seed(0), context=CTX)
    e0 = hard_routed_error(stack.delta(), start.A, start.heads, start.routing, distance).mean(1)
    e1 = hard_routed_error(stack.delta(), done.A, done.heads, done.routing, distance).mean(1)
    assert bool((e1 <= e0 + 1e-7).all())
    if distance == "mae":
        assert float(e1.sum()) < float(e0.sum())  # MAE differs from Frobenius: it must improve


def test_refine_returns_best_iterate_even_with_a_bad_learning_rate():
    stack = random_stack(G=2, K=3, seed=1)
    delta = stack.delta()
    a = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(0))
    heads = torch.zeros(2, 1, 6, 2)
    routing = torch.zeros(2, 3, dtype=torch.long)
    start = hard_routed_error(delta, a, heads, routing, "mae").mean(1)
    a2, h2, err = refine(delta, a, heads, routing, distance="mae", steps=5, lr=1e6)
    assert bool((err.mean(1) <= start).all())
    assert torch.allclose(err, hard_routed_error(delta, a2, h2, routing, "mae"))


def test_paper_init_matches_nn_linear_and_zero_heads():
    gen = torch.Generator().manual_seed(0)
    a, b, c = init_params(2, 3, 2, 6, 4, 50, generator=gen, device="cpu", dtype=torch.float32)
    bound = 1 / math.sqrt(50)  # nn.Linear's kaiming_uniform_(a=sqrt(5)) bound
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.9 * bound
    assert float(b.abs().max()) == 0.0
    assert c is not None and c.shape == (2, 3, 2)
    _, _, c_k = init_params(1, 3, 3, 6, 4, 5, generator=gen, device="cpu", dtype=torch.float32)
    assert c_k is None  # M = K: Eq. 2, no routing logits


def test_paper_solver_converges_on_an_easy_problem():
    stack = random_stack(G=1, K=2, d=5, k=6, r=2, shared_a=True, seed=3)
    delta = stack.delta()
    a, heads, routing = paper_solve(
        delta,
        2,
        2,
        distance="mse",
        epochs=400,
        lr=0.05,
        weight_decay=0.0,
        temperature=0.2,
        num_factor_tensors=2,
        generator=torch.Generator().manual_seed(0),
    )
    err = hard_routed_error(delta, a, heads, routing, "mse").mean()
    assert float(err) < 1e-3 * float(delta.square().mean())


def test_paper_temperature_convention_is_softmax_c_over_t():
    """With C' fixed (lr 0 on C' is not possible in AdamW, so use epochs=0) routing = argmax C'."""
    gen = torch.Generator().manual_seed(5)
    stack = random_stack(G=2, K=4, seed=2)
    _, _, routing = paper_solve(
        stack.delta(),
        2,
        3,
        distance="mae",
        epochs=0,
        lr=0.01,
        weight_decay=0.01,
        temperature=0.2,
        num_factor_tensors=2,
        generator=gen,
    )
    gen2 = torch.Generator().manual_seed(5)
    _, _, c = init_params(2, 4, 3, 6, 2, 5, generator=gen2, device="cpu", dtype=torch.float32)
    assert routing.tolist() == c.argmax(-1).tolist()


def test_fast_solver_beats_paper_soft_routing_on_hard_routed_error():
    stack = random_stack(G=2, K=4, d=10, k=12, r=3, seed=8)
    m = get_method("hydraopt")
    fast = m.merge(
        stack, HydraOptConfig(heads=2), generator=torch.Generator().manual_seed(0), context=CTX
    )
    paper = m.merge(
        stack,
        HydraOptConfig(heads=2, solver="paper", epochs=300),
        generator=torch.Generator().manual_seed(0),
        context=CTX,
    )
    d = stack.delta()
    e_fast = hard_routed_error(d, fast.A, fast.heads, fast.routing, "mae").mean()
    e_paper = hard_routed_error(d, paper.A, paper.heads, paper.routing, "mae").mean()
    assert float(e_fast) <= float(e_paper)


@pytest.mark.parametrize("num_heads", [1, 2, 3])
@pytest.mark.parametrize("path", ["per_task", "per_head", "fused"])
def test_hand_written_mae_gradient_equals_autograd(num_heads, path):
    from hydraopt.merge.gradients import MaeWorkspace, mae_value_and_grads, mae_workspace

    stack = random_stack(G=2, K=4, d=6, k=5, r=2, seed=12)
    delta = stack.delta().double()
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    heads = torch.randn(2, num_heads, 6, 2, generator=gen, dtype=torch.float64)
    heads.requires_grad_(True)
    routing = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]]) % num_heads
    loss = hard_routed_error(delta, a, heads, routing, "mae").mean(1)
    loss.sum().backward()
    if path == "fused":  # the CPU kernel takes float32 (or bfloat16), compared in float64
        pytest.importorskip("numba")
        low = delta.float()
        work = mae_workspace(low.shape, num_heads, low.dtype, fused=True)
        value, g_a, g_h = mae_value_and_grads(low, a.detach(), heads.detach(), routing, work)
        tol = dict(rtol=1e-5, atol=1e-6 * float(a.grad.abs().max()))
        assert torch.allclose(value, loss.detach(), rtol=1e-5)
        assert torch.allclose(g_a, a.grad, **tol)
        assert torch.allclose(g_h, heads.grad, rtol=1e-5, atol=1e-6 * float(heads.grad.abs().max()))
        return
    value, g_a, g_h = mae_value_and_grads(
        delta,
        a.detach(),
        heads.detach(),
        routing,
        MaeWorkspace(torch.empty_like(delta), fused=False),
        per_head=path == "per_head",
    )
    assert torch.allclose(value, loss.detach())
    assert torch.allclose(g_a, a.grad) and torch.allclose(g_h, heads.grad)


@pytest.mark.parametrize("error_distance", ["mae", "fro"])
def test_bundle_errors_equal_a_plain_recomputation(make_adapter, monkeypatch, error_distance):
    """The errors a bundle reports, whether the refinement measured them (mae: the engine must
    not form the updates again) or the engine did (fro), are f(ΔW_i, heads[route] A') and
    f(ΔW_i, 0) computed the plain way."""
    from hydraopt import engine, engine_chunks, load_adapter_set, merge_adapter_set
    from hydraopt.merge.distances import get_distance

    aset = load_adapter_set(
        [make_adapter(f"t{i}", seed=i + 1, alpha=4 * (i + 1)) for i in range(3)]
    )
    if error_distance == "mae":

        def refuse(*args, **kwargs):
            raise AssertionError("the engine recomputed errors the refinement had measured")

        monkeypatch.setattr(engine_chunks, "hard_routed_error", refuse)
        monkeypatch.setattr(engine_chunks, "distance_to_zero", refuse)
    options = engine.EngineOptions(error_distance=error_distance)
    bundle = merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 5}, engine=options)
    f = get_distance(error_distance)
    for spec in aset.modules:
        delta = aset.load_stack([spec]).delta()[0]  # (K, d, k)
        m = bundle.merged[spec.name]
        a, heads, routing = m.A, m.heads, m.routing
        got = torch.tensor(bundle.provenance.errors[spec.name])
        assert torch.allclose(got, f(delta, heads[routing] @ a), rtol=1e-5, atol=1e-9)
        zero = torch.tensor(bundle.provenance.zero_errors[spec.name])
        assert torch.allclose(zero, f(delta, torch.zeros_like(delta)), rtol=1e-5)


@pytest.mark.parametrize("result_dtype", ["float16", "bfloat16"])
def test_result_dtype_holds_the_same_bits_as_casting_at_the_save(make_adapter, result_dtype):
    """The CLI keeps the merged factors in the bundle's dtype as chunks finish: the tensors must
    be exactly the float32 result cast, with the same routing and errors."""
    from hydraopt import engine, load_adapter_set, merge_adapter_set
    from hydraopt.io.bundle import DTYPES

    aset = load_adapter_set([make_adapter(f"t{i}", seed=i + 1) for i in range(3)])
    config = {"heads": 2, "refine_steps": 5}
    full = merge_adapter_set(aset, "hydraopt", config)
    kept = merge_adapter_set(
        aset, "hydraopt", config, engine=engine.EngineOptions(result_dtype=result_dtype)
    )
    assert kept.provenance.errors == full.provenance.errors
    for name, m in full.merged.items():
        a, heads, routing = m.A, m.heads, m.routing
        k = kept.merged[name]
        k_a, k_heads, k_routing = k.A, k.heads, k.routing
        assert a.dtype == torch.float32 and k_a.dtype == k_heads.dtype == DTYPES[result_dtype]
        assert torch.equal(k_a, a.to(k_a.dtype)) and torch.equal(k_heads, heads.to(k_a.dtype))
        assert torch.equal(k_routing, routing)
    with pytest.raises(HydraoptError, match="result_dtype"):
        engine.EngineOptions(result_dtype="float8")


def test_float32_path_takes_fewer_steps_where_every_step_sees_every_task():
    assert HydraOptConfig(heads=1).refine_schedule(5, "float32") == (45, 1.0)
    assert HydraOptConfig(heads=2).refine_schedule(5, "float32") == (40, 1.0)
    assert HydraOptConfig(heads=4).refine_schedule(5, "float32") == (40, 1.0)
    assert HydraOptConfig(heads=5).refine_schedule(5, "float32") == (10, 0.05)
    assert HydraOptConfig(heads=1).refine_schedule(1, "float32") == (10, 0.05)  # M = K = 1
    assert HydraOptConfig(heads=2).refine_schedule(5, "bfloat16") == (100, 1.0)
    # Sampled steps (K > refine_tasks), other distances and set fields keep their schedule.
    assert HydraOptConfig(heads=2).refine_schedule(40, "float32") == (100, 1.0)
    assert HydraOptConfig(heads=2, distance="fro").refine_schedule(5, "float32") == (100, 1.0)
    assert HydraOptConfig(heads=2, refine_steps=30).refine_schedule(5, "float32") == (30, 1.0)


def test_float32_one_head_schedule_takes_less_momentum():
    assert HydraOptConfig(heads=1).refine_momentum(5, "float32") == 0.7
    # Everywhere else torch's beta1: bf16, M > 1, M = K, sampled steps, other distances, set steps.
    assert HydraOptConfig(heads=1).refine_momentum(5, "bfloat16") == 0.9
    assert HydraOptConfig(heads=2).refine_momentum(5, "float32") == 0.9
    assert HydraOptConfig(heads=1).refine_momentum(1, "float32") == 0.9
    assert HydraOptConfig(heads=1).refine_momentum(40, "float32") == 0.9
    assert HydraOptConfig(heads=1, distance="fro").refine_momentum(5, "float32") == 0.9
    assert HydraOptConfig(heads=1, refine_steps=60).refine_momentum(5, "float32") == 0.9


@pytest.mark.parametrize(
    ("precision", "steps", "momentum"), [("float32", 45, 0.7), ("bfloat16", 100, 0.9)]
)
def test_merge_refines_with_the_resolved_precisions_schedule(
    monkeypatch, precision, steps, momentum
):
    import hydraopt.merge.hydraopt as module

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["steps"], kwargs["precision"], kwargs["momentum"]))
        return refine_measured(*args, **kwargs)

    monkeypatch.setattr(module, "refine_measured", spy)
    cfg = HydraOptConfig(heads=1, refine_precision=precision)
    get_method("hydraopt").merge(
        random_stack(K=3), cfg, generator=torch.Generator().manual_seed(0), context=CTX
    )
    assert seen == [(steps, precision, momentum)]


def test_sampled_refinement_that_would_not_see_every_task_is_skipped():
    # 8 tasks per step: 100 steps (M < K) draw 800 tasks, 20 (M = K) 160; fewer than K: no steps
    # (at K = 200-1,000 such loops never beat their start); a set refine_steps still runs.
    assert HydraOptConfig(heads=1).refine_schedule(800) == (100, 1.0)
    assert HydraOptConfig(heads=1).refine_schedule(801) == (0, 1.0)
    assert HydraOptConfig(heads=2).refine_schedule(1000)[0] == 0
    assert HydraOptConfig(heads=160).refine_schedule(160) == (20, 0.05)
    assert HydraOptConfig(heads=161).refine_schedule(161) == (0, 0.05)
    assert HydraOptConfig(heads=1, refine_tasks=16).refine_schedule(1000)[0] == 100
    assert HydraOptConfig(heads=1, refine_steps=50).refine_schedule(1000)[0] == 50


def test_refine_schedule_defaults_depend_on_whether_heads_are_shared():
    assert HydraOptConfig(heads=2).refine_schedule(5) == (100, 1.0)
    assert HydraOptConfig(heads=5).refine_schedule(5) == (20, 0.05)
    # Set fields win, each on its own.
    assert HydraOptConfig(heads=5, refine_steps=100).refine_schedule(5) == (100, 0.05)
    assert HydraOptConfig(heads=2, refine_lr=0.3).refine_schedule(5) == (100, 0.3)
    assert HydraOptConfig(heads=5, refine_steps=0).refine_schedule(5) == (0, 0.05)
    with pytest.raises(HydraoptError, match="refine_lr"):
        HydraOptConfig(heads=1, refine_lr=0.0)
    with pytest.raises(HydraoptError, match="refine_steps"):
        HydraOptConfig(heads=1, refine_steps=-1)


@pytest.mark.parametrize("distance", ["mae", "fro"])
def test_scaled_one_head_of_many_adapters_hands_on_the_engines_numbers(distance):
    # M = 1 of many adapters (targets kept as factors): the head scale applies after the
    # refinement, and the merge measures the scaled result itself (one pass, the zero yardstick
    # from the refinement's): the very numbers the engine would measure, bit for bit.
    from hydraopt.merge.measure import distance_to_zero
    from hydraopt.merge.targets import FactorTargets

    K = 12
    stack = random_stack(G=2, K=K, d=6, k=5, r=2, seed=7)
    config = HydraOptConfig(heads=1, distance=distance, refine_tasks=4)
    assert config.resolved_head_scale(K) != 1.0
    out = get_method("hydraopt").merge(
        stack,
        config,
        generator=torch.Generator().manual_seed(0),
        context=MergeContext(num_tasks=K, num_factor_tensors=8),
    )
    assert out.measured is not None and out.measured.distance == distance
    targets = FactorTargets(stack.A, stack.scaled_B)
    want = hard_routed_error(targets, out.A, out.heads, out.routing, distance)
    assert torch.equal(out.measured.error, want)
    assert torch.equal(out.measured.zero, distance_to_zero(targets, distance))
    # Every task refined at once (targets dense): the engine measures, as before.
    dense = get_method("hydraopt").merge(
        stack,
        HydraOptConfig(heads=1, distance=distance, refine_tasks=K),
        generator=torch.Generator().manual_seed(0),
        context=MergeContext(num_tasks=K, num_factor_tensors=8),
    )
    assert dense.measured is None
