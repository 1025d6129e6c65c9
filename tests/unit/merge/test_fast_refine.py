"""The fast paths of the refinement (bfloat16 products, task sampling, median start) against the
plain ones on small inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import random_stack

from hydraopt.devices import fast_bfloat16, resolve_precision
from hydraopt.merge.closed_form import projected_heads, routed_heads, shared_a
from hydraopt.merge.gradients import MaeWorkspace, mae_value_and_grads
from hydraopt.merge.measure import hard_routed_error
from hydraopt.merge.median_start import fit_shared_factors, median_start, median_targets
from hydraopt.merge.refine import refine


def closed_form_start(stack, routing, M):
    a, _ = shared_a(stack.A, stack.scaled_B, routing, M)
    return a, routed_heads(projected_heads(stack.A, stack.scaled_B, a), routing, M)


def test_bfloat16_gradients_follow_float32():
    stack = random_stack(G=2, K=4, d=48, k=40, r=3, seed=3)
    delta = stack.delta()
    routing = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]])
    a, heads = closed_form_start(stack, routing, 2)
    heads = heads * 1.3  # away from the optimum, so the gradient is not tiny noise
    ref = mae_value_and_grads(
        delta, a, heads, routing, MaeWorkspace(torch.empty_like(delta), fused=False)
    )
    low = delta.to(torch.bfloat16)
    got = mae_value_and_grads(
        low, a, heads, routing, MaeWorkspace(torch.empty_like(low), fused=False)
    )
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.allclose(got[0], ref[0], rtol=2e-2)
    for g, r in zip(got[1:], ref[1:], strict=True):
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cosine > 0.98


def test_loss_can_be_skipped_without_changing_gradients():
    stack = random_stack(G=1, K=3, d=8, k=7, r=2, seed=5)
    delta = stack.delta()
    routing = torch.tensor([[0, 1, 0]])
    a, heads = closed_form_start(stack, routing, 2)
    with_loss = mae_value_and_grads(
        delta, a, heads, routing, MaeWorkspace(torch.empty_like(delta), fused=False)
    )
    without = mae_value_and_grads(
        delta,
        a,
        heads,
        routing,
        MaeWorkspace(torch.empty_like(delta), fused=False),
        with_loss=False,
    )
    assert without[0] is None
    assert torch.equal(with_loss[1], without[1]) and torch.equal(with_loss[2], without[2])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("tasks_per_step", [None, 2])
def test_refine_never_worse_than_start_and_lowers_mae(precision, tasks_per_step):
    stack = random_stack(G=2, K=5, d=30, k=24, r=3, seed=7)
    delta = stack.delta()
    routing = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    a, heads = closed_form_start(stack, routing, 2)
    start = hard_routed_error(delta, a, heads, routing, "mae").mean(1)
    gen = torch.Generator().manual_seed(0)
    a2, h2, err = refine(
        delta,
        a,
        heads,
        routing,
        distance="mae",
        # Sampled steps are noisy: more of them, smaller (each costs 2/5 of a full one).
        steps=40 if tasks_per_step is None else 200,
        lr=1.0 if tasks_per_step is None else 0.3,
        precision=precision,
        tasks_per_step=tasks_per_step,
        generator=gen,
    )
    per_task = hard_routed_error(delta, a2, h2, routing, "mae")
    # The reported errors are the float32 truth, task by task.
    assert err.shape == per_task.shape and torch.allclose(per_task, err, rtol=1e-5)
    final = per_task.mean(1)
    assert bool((final <= start).all())
    assert bool((final < start * 0.999).any())  # and the refinement does something


def test_sampling_all_tasks_is_the_full_batch_and_sampling_is_seeded():
    stack = random_stack(G=1, K=4, d=20, k=16, r=2, seed=9)
    delta = stack.delta()
    routing = torch.tensor([[0, 0, 1, 1]])
    a, heads = closed_form_start(stack, routing, 2)
    kw = dict(distance="mae", steps=15, lr=1.0)
    full = refine(delta, a, heads, routing, **kw)
    all_tasks = refine(
        delta, a, heads, routing, **kw, tasks_per_step=4, generator=torch.Generator()
    )
    assert all(torch.equal(x, y) for x, y in zip(full, all_tasks, strict=True))
    runs = [
        refine(
            delta,
            a,
            heads,
            routing,
            **kw,
            tasks_per_step=2,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))
    with pytest.raises(ValueError, match="generator"):
        refine(delta, a, heads, routing, **kw, tasks_per_step=2)


def test_median_targets_by_hand():
    # G=1, K=4, d=1, k=2; head 0 <- tasks 0,1,2 (odd), head 1 <- task 3, head 2 <- none.
    delta = torch.tensor([[[[1.0, -5.0]], [[4.0, 0.0]], [[2.0, 9.0]], [[7.0, 7.0]]]])
    routing = torch.tensor([[0, 0, 0, 1]])
    got = median_targets(delta, routing, 3)
    assert got[0, 0].tolist() == [[2.0, 0.0]]
    assert got[0, 1].tolist() == [[7.0, 7.0]]
    assert got[0, 2].tolist() == [[0.0, 0.0]]
    # Even count: the mean of the two middle values (torch.median would return the lower one).
    routing = torch.tensor([[0, 0, 0, 0]])
    assert median_targets(delta, routing, 1)[0, 0].tolist() == [[3.0, 3.5]]


def test_fit_shared_factors_reproduces_targets_in_the_span():
    gen = torch.Generator().manual_seed(0)
    r, k = 2, 9
    a_true = torch.randn(1, r, k, generator=gen)
    heads_true = torch.randn(1, 3, 5, r, generator=gen)
    targets = heads_true @ a_true[:, None]  # (1, 3, 5, k): rank r, rows in span(a_true)
    basis = torch.cat([a_true, torch.randn(1, 2, k, generator=gen)], dim=1)  # a wider span
    a, heads = fit_shared_factors(targets, torch.tensor([[1, 2, 3]]), basis, r)
    assert torch.allclose(heads @ a[:, None], targets, atol=1e-5)
    assert torch.allclose(a @ a.transpose(-1, -2), torch.eye(r)[None], atol=1e-5)


def test_median_start_keeps_closed_form_for_small_clusters_and_improves_large_ones():
    stack = random_stack(G=2, K=5, d=24, k=20, r=3, seed=11)
    delta = stack.delta()
    pairs = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]])  # no head has 3 tasks
    a, heads = closed_form_start(stack, pairs, 3)
    same = median_start(delta, stack.A, a, heads, pairs)
    assert same[0] is a and same[1] is heads
    one = torch.zeros(2, 5, dtype=torch.long)
    a, heads = closed_form_start(stack, one, 1)
    a2, h2 = median_start(delta, stack.A, a, heads, one)
    before = hard_routed_error(delta, a, heads, one, "mae").mean(1)
    after = hard_routed_error(delta, a2, h2, one, "mae").mean(1)
    assert bool((after <= before).all())


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"
    assert resolve_precision("auto", cpu) == ("bfloat16" if fast_bfloat16(cpu) else "float32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("float16", cpu)


@pytest.mark.parametrize("distance", ["mae", "mse", "fro", "cos"])
def test_blocked_error_equals_the_dense_distance(distance):
    from hydraopt.merge.distances import get_distance

    stack = random_stack(G=2, K=11, d=7, k=6, r=2, seed=13)  # K > ERROR_BLOCK: several blocks
    delta = stack.delta()
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 2, 6, generator=gen)
    heads = torch.randn(2, 3, 7, 2, generator=gen)
    routing = torch.randint(0, 3, (2, 11), generator=gen)
    dense = get_distance(distance)(delta, heads[torch.arange(2)[:, None], routing] @ a[:, None])
    got = hard_routed_error(delta, a, heads, routing, distance)
    assert got.shape == (2, 11)
    assert torch.allclose(got, dense, rtol=1e-5, atol=1e-7)


def test_float32_routing_search_of_many_adapters_matches_float64(monkeypatch):
    import hydraopt.merge.routing as routing_mod

    stack = random_stack(G=2, K=18, d=12, k=10, r=2, seed=17)  # K > FLOAT32_SEARCH_FROM
    runs = {}
    monkeypatch.setattr(routing_mod, "SCREEN_STARTS_FROM", 10**9)  # every start alternated
    for label, threshold in (("float32", 16), ("float64", 10**9)):
        monkeypatch.setattr(routing_mod, "FLOAT32_SEARCH_FROM", threshold)
        gen = torch.Generator().manual_seed(0)
        runs[label] = routing_mod.best_routing(stack.A, stack.scaled_B, 3, generator=gen)
    (r32, a32, e32), (_, _, e64) = runs["float32"], runs["float64"]
    # The winner is re-solved in float64: its error is exact for its routing ...
    exact_a, exact_e = shared_a(stack.A, stack.scaled_B, r32, 3)
    assert torch.allclose(e32, exact_e) and torch.allclose(a32, exact_a)
    # ... and the float32 search finds as good a routing as the float64 one.
    assert bool((e32 <= e64 * (1 + 1e-4)).all())


def test_factor_targets_stand_in_for_the_dense_updates():
    from hydraopt.merge.targets import FactorTargets

    stack = random_stack(G=2, K=11, d=9, k=8, r=2, seed=19)
    dense = stack.delta()
    lazy = FactorTargets(stack.A, stack.scaled_B)
    assert lazy.shape == dense.shape
    idx = torch.tensor([3, 0, 7])
    assert torch.allclose(lazy.take(idx), dense[:, idx], atol=1e-6)
    routing = torch.randint(0, 3, (2, 11), generator=torch.Generator().manual_seed(1))
    a, heads = closed_form_start(stack, routing, 3)
    for distance in ("mae", "cos"):
        assert torch.allclose(
            hard_routed_error(lazy, a, heads, routing, distance),
            hard_routed_error(dense, a, heads, routing, distance),
            rtol=1e-5,
            atol=1e-7,
        )
    kw = dict(distance="mae", steps=20, lr=0.3, tasks_per_step=4)
    got = refine(lazy, a, heads, routing, **kw, generator=torch.Generator().manual_seed(5))
    want = refine(dense, a, heads, routing, **kw, generator=torch.Generator().manual_seed(5))
    for x, y in zip(got, want, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [12, 64])
def test_screened_starts_of_many_adapters_find_planted_groups(k):
    """K > SCREEN_STARTS_FROM: one alternation from the best start still finds clear groups,
    in the float32 search, through the k x k (K r > k) and the Kr x Kr path (K r <= k)."""
    from hydraopt.merge.routing import best_routing
    from hydraopt.types import LoraStack

    base = random_stack(G=2, K=3, d=10, k=k, r=2, seed=23)
    groups = torch.arange(21) % 3  # 21 tasks in 3 planted groups
    noise = torch.Generator().manual_seed(2)
    B = base.B[:, groups] * (1 + 0.01 * torch.randn(2, 21, 10, 2, generator=noise))
    A = base.A[:, groups]
    stack = LoraStack(A, B, torch.ones(2, 21))
    routing, a, err = best_routing(A, stack.scaled_B, 3, generator=torch.Generator().manual_seed(0))
    # The winner is recomputed in float64: its error is the exact closed form's.
    _, exact = shared_a(A, stack.scaled_B, routing, 3)
    assert torch.allclose(err, exact) and a.dtype == A.dtype
    for g in range(2):
        found = routing[g]
        # same partition as the planted one, whatever the head labels
        assert all(int(found[i]) == int(found[groups == groups[i]][0]) for i in range(21))
        assert len(set(found.tolist())) == 3


def test_best_start_is_the_lowest_kmeans_objective():
    from hydraopt.merge.routing import _best_start, _gram, _kmeans_objective

    points = torch.tensor([[0.0], [0.1], [5.0], [5.2]]).expand(2, 4, 1)[:, :, :, None]
    gram = _gram(points)  # (2, 4, 4)
    good = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    bad = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 1]])
    picked = _best_start(gram, [bad, good], 2)
    assert torch.equal(picked, good)
    assert bool((_kmeans_objective(gram, good, 2) < _kmeans_objective(gram, bad, 2)).all())


@pytest.mark.parametrize("distance", ["mae", "mse", "fro", "cos"])
def test_distance_to_zero_is_the_error_of_storing_nothing(distance):
    from hydraopt.merge.distances import get_distance
    from hydraopt.merge.measure import distance_to_zero
    from hydraopt.merge.targets import FactorTargets

    stack = random_stack(G=2, K=11, d=7, k=6, r=2, seed=23)  # K > ERROR_BLOCK: several blocks
    dense = stack.delta()
    kept = dense.clone()
    want = get_distance(distance)(dense, torch.zeros_like(dense))
    for targets in (dense, FactorTargets(stack.A, stack.scaled_B)):
        got = distance_to_zero(targets, distance)
        assert got.shape == (2, 11)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(dense, kept)  # the in-place formulas worked on a copy


class _OneByOne:
    """A FactorRefinement seen only through the Parameterisation protocol: every point measured
    on its own (the evaluation order before the one-pass one)."""

    def __init__(self, inner):
        self.inner = inner
        self.best_from, self.check_every = inner.best_from, inner.check_every
        self.hand_written = inner.hand_written

    def __getattr__(self, name):
        if name in ("errors", "release"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def begin(self):
        self.inner.begin()
        self.inner.sample_buf = None  # each step's targets freshly formed, as before


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize(("M", "lr"), [(1, 0.3), (3, 0.3), (11, 0.05), (3, 1e6)])
def test_sampled_refinement_measures_start_and_end_in_one_pass_with_the_same_result(
    M, lr, precision
):
    # Sampled steps look at no loss: the start and the last iterate are measured together after
    # the loop (and the zero yardstick with them), and each step's sampled targets go into one
    # reused buffer. The point and the errors must be those of measuring each on its own and
    # forming fresh targets, bit for bit, including where the start wins (lr = 1e6).
    from hydraopt.merge.measure import distance_to_zero
    from hydraopt.merge.refine import (
        FactorRefinement,
        MeasuresTogether,
        balance,
        refine_measured,
        refine_parameters,
    )
    from hydraopt.merge.targets import FactorTargets

    stack = random_stack(G=3, K=11, d=9, k=8, r=2, seed=M)
    lazy = FactorTargets(stack.A, stack.scaled_B)
    routing = torch.randint(0, M, (3, 11), generator=torch.Generator().manual_seed(1))
    routing[:, :M] = torch.arange(M)  # every head used
    a, heads = balance(*closed_form_start(stack, routing, M))

    def problem(wrap):
        inner = FactorRefinement(
            lazy, routing, distance="mae", num_heads=M, precision=precision, tasks_per_step=4,
            generator=torch.Generator().manual_seed(5), with_zero=True,
        )  # fmt: skip
        return (_OneByOne(inner) if wrap else inner), inner

    runs = []
    for wrap in (False, True):
        p, inner = problem(wrap)
        assert isinstance(p, MeasuresTogether) != wrap
        runs.append((refine_parameters(p, [a, heads], steps=8, lr=lr), inner.zero))
    (got_point, got_err), zero = runs[0]
    (want_point, want_err), none = runs[1]
    for x, y in zip([*got_point, got_err], [*want_point, want_err], strict=True):
        assert torch.equal(x, y)
    assert none is None and zero is not None
    assert torch.equal(zero, distance_to_zero(lazy, "mae"))
    if lr > 1:  # the start won everywhere: kept exactly
        assert torch.equal(got_point[0], a) and torch.equal(got_point[1], heads)
    kw = dict(distance="mae", steps=8, lr=lr, tasks_per_step=4, precision=precision)
    gen = torch.Generator().manual_seed(5)
    _, _, measured, _ = refine_measured(lazy, a, heads, routing, **kw, generator=gen)
    assert torch.equal(measured.zero, zero)


def test_kept_heads_gradient_buffer_gives_the_fresh_gradients_bit_for_bit():
    # M > K / 2 (per-task path): the heads' gradient goes into a buffer kept in the workspace;
    # two calls in a row (the buffer zeroed between them) give the fresh allocation's numbers.
    from hydraopt.merge.gradients import mae_value_and_grads, mae_workspace

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(2, 4, 7, 6, generator=gen)
    routing = torch.tensor([[0, 5, 2, 9], [1, 1, 3, 8]])
    kept = mae_workspace(delta.shape, 10, torch.float32, fused=False, heads_grad=(2, torch.float32))
    fresh = mae_workspace(delta.shape, 10, torch.float32, fused=False)
    assert kept.heads_grad is not None and fresh.heads_grad is None
    for _ in range(2):
        a, heads = torch.randn(2, 2, 6, generator=gen), torch.randn(2, 10, 7, 2, generator=gen)
        got = mae_value_and_grads(delta, a, heads, routing, kept)
        want = mae_value_and_grads(delta, a, heads, routing, fresh)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)
        assert got[2].data_ptr() == kept.heads_grad.data_ptr()
