"""VeRA merging: the closed form against dense linear algebra, invariants, classic merges
against PEFT's merge_utils, and the registry wiring."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import peft_merge

from hydraopt.engine import resolve_config
from hydraopt.errors import HydraoptError
from hydraopt.kinds.registry import get_kind
from hydraopt.kinds.vera.config import VeraHydraOptConfig
from hydraopt.kinds.vera.merge import assemble
from hydraopt.kinds.vera.solve import fit_shared, solve_vera
from hydraopt.merge.base import MergeContext
from hydraopt.merge.classic import A_ONLY_METHODS, CLASSIC_METHODS, ClassicConfig
from hydraopt.merge.measure import hard_routed_error
from hydraopt.merge.registry import get_method, list_methods
from hydraopt.types import VeraStack

CTX = MergeContext(num_tasks=3, num_factor_tensors=2)
SIDES = ("lambda_d", "lambda_b")


def random_vera(G=2, K=4, d=7, k=6, r=3, *, seed=0, share=None, groups=None) -> VeraStack:
    """Random λ's; ``share`` makes that vector equal across tasks; ``groups`` (task -> group)
    makes the *other* vector equal within a group."""
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen)
    b, e = torch.randn(G, K, d, generator=gen), torch.randn(G, K, r, generator=gen)
    if share == "lambda_d":
        e = e[:, :1].expand(G, K, r).clone()
    if share == "lambda_b":
        b = b[:, :1].expand(G, K, d).clone()
    if groups is not None:
        idx = torch.tensor(groups)
        if share == "lambda_d":
            b = b[:, idx]
        else:
            e = e[:, idx]
    return VeraStack(b, e, A, B)


def dense(stack: VeraStack, merged) -> torch.Tensor:
    lam_b, lam_d = merged.routed()
    return (lam_b[..., None] * stack.B.to(lam_b.dtype)) @ (
        lam_d[..., None] * stack.A.to(lam_d.dtype)
    )


@pytest.mark.parametrize("shared", SIDES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_closed_form_error_equals_the_dense_error(shared, M):
    stack = random_vera(seed=M)
    s, heads, routing, err = solve_vera(
        stack.lambda_b,
        stack.lambda_d,
        stack.A,
        stack.B,
        M,
        shared=shared,
        generator=torch.Generator().manual_seed(0),
    )
    merged = assemble(shared, s, heads, routing)
    truth = (stack.delta().double() - dense(stack, merged)).square().sum((1, 2, 3))
    assert torch.allclose(err, truth, rtol=1e-6)
    assert merged.lambda_b.shape[1] == (M if shared == "lambda_d" else 1)
    assert merged.lambda_d.shape[1] == (1 if shared == "lambda_d" else M)


@pytest.mark.parametrize("shared", SIDES)
def test_fit_shared_is_the_dense_least_squares_solution(shared):
    """ΔW' is linear in the shared vector: compare with lstsq on its (d*k, n) design matrix."""
    stack = random_vera(G=1, K=3, seed=4)
    P, A = stack.B.double(), stack.A.double()
    b, e = stack.lambda_b.double(), stack.lambda_d.double()
    routing = torch.tensor([[0, 1, 0]])
    n_head = b.shape[2] if shared == "lambda_d" else e.shape[2]
    heads = torch.randn(
        1, 2, n_head, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    ours = fit_shared(shared, heads, routing, b, e, P, A @ A.T)[0]
    columns, targets = [], []
    for i in range(3):
        head = heads[0, routing[0, i]]
        n = e.shape[2] if shared == "lambda_d" else b.shape[2]
        cols = []
        for t in range(n):
            unit = torch.zeros(n, dtype=torch.float64)
            unit[t] = 1.0
            lb, ld = (head, unit) if shared == "lambda_d" else (unit, head)
            cols.append(((lb[:, None] * P) @ (ld[:, None] * A)).flatten())
        columns.append(torch.stack(cols, 1))
        targets.append(((b[0, i][:, None] * P) @ (e[0, i][:, None] * A)).flatten())
    reference = torch.linalg.lstsq(torch.cat(columns), torch.cat(targets)[:, None]).solution[:, 0]
    assert torch.allclose(ours, reference, atol=1e-9)


@pytest.mark.parametrize("shared", SIDES)
@pytest.mark.parametrize("distance", ["mae", "mse", "fro", "cos"])
def test_m_equals_k_reproduces_adapters_that_share_the_fixed_vector(shared, distance):
    stack = random_vera(share=shared, seed=3)
    config = VeraHydraOptConfig(heads=4, distance=distance, shared=shared, refine_steps=10)
    out = get_method("hydraopt").merge_vera(
        stack, config, generator=torch.Generator().manual_seed(0), context=CTX
    )
    assert out.routing.tolist() == [[0, 1, 2, 3]] * 2
    assert torch.allclose(dense(stack, out), stack.delta(), atol=1e-5)


@pytest.mark.parametrize("shared", SIDES)
def test_planted_groups_are_found_exactly(shared):
    """Tasks in two groups that share the routed vector within the group: M = 2 is exact."""
    groups = [0, 1, 1, 0, 1]
    stack = random_vera(G=3, K=5, share=shared, groups=groups, seed=8)
    s, heads, routing, err = solve_vera(
        stack.lambda_b,
        stack.lambda_d,
        stack.A,
        stack.B,
        2,
        shared=shared,
        generator=torch.Generator().manual_seed(0),
    )
    energy = stack.delta().double().square().sum((1, 2, 3))
    assert (err / energy).max() < 1e-10
    for g in range(3):
        same = routing[g, 0] == routing[g]
        assert same.tolist() == [x == groups[0] for x in groups]


@pytest.mark.parametrize("shared", SIDES)
@pytest.mark.parametrize("distance", ["mae", "fro", "cos"])
def test_refinement_never_worsens_the_hard_routed_error(shared, distance):
    stack = random_vera(G=2, K=4, seed=6)
    gen = torch.Generator().manual_seed(0)
    closed = get_method("hydraopt").merge_vera(
        stack,
        VeraHydraOptConfig(heads=2, distance=distance, shared=shared, refine_steps=0),
        generator=gen,
        context=CTX,
    )
    refined = get_method("hydraopt").merge_vera(
        stack,
        VeraHydraOptConfig(heads=2, distance=distance, shared=shared, refine_steps=30),
        generator=torch.Generator().manual_seed(0),
        context=CTX,
    )
    delta = stack.delta()
    errors = []
    for out in (closed, refined):
        a, heads = out.as_lora(stack.A, stack.B)
        errors.append(hard_routed_error(delta, a, heads, out.routing, distance).mean(1))
    assert (errors[1] <= errors[0] + 1e-7).all()
    if distance == "mae":
        assert (errors[1] < errors[0]).all()  # the L1 optimum is not the Frobenius one


def test_as_lora_matches_the_vera_product():
    stack = random_vera(seed=2)
    for shared in SIDES:
        s, heads, routing, _ = solve_vera(
            stack.lambda_b,
            stack.lambda_d,
            stack.A,
            stack.B,
            2,
            shared=shared,
            generator=torch.Generator().manual_seed(0),
        )
        merged = assemble(shared, s.float(), heads.float(), routing)
        a, lora_heads = merged.as_lora(stack.A, stack.B)
        g_idx = torch.arange(2)[:, None]
        assert torch.allclose(
            lora_heads[g_idx, routing] @ a[:, None], dense(stack, merged), atol=1e-5
        )


@pytest.mark.parametrize("name", CLASSIC_METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_classic_vera_merges_equal_peft_merge_utils_on_the_vectors(name, sign):
    """λd (as A: signed sqrt weights) then λb (as B), each with PEFT's own function."""
    stack = random_vera(G=1, K=3, d=9, r=5, seed=5)
    weights, density, seed = [0.7, -0.4, 1.3], 0.6, 99
    config = ClassicConfig(weights=tuple(weights), density=density, majority_sign_method=sign)
    out = get_method(name).merge_vera(
        stack, config, generator=torch.Generator().manual_seed(seed), context=CTX
    )
    w_d = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in weights])
    w_b = torch.tensor([math.sqrt(abs(w)) for w in weights])
    torch.manual_seed(seed)  # PEFT's DARE draws from the global RNG: λd first, then λb
    ref_d = peft_merge(name, list(stack.lambda_d[0]), w_d, density, sign)
    ref_b = peft_merge(name, list(stack.lambda_b[0]), w_b, density, sign)
    assert torch.allclose(out.lambda_d[0, 0], ref_d, atol=1e-6)
    assert torch.allclose(out.lambda_b[0, 0], ref_b, atol=1e-6)
    assert out.routing.tolist() == [[0, 0, 0]]


def test_golden_task_arithmetic_on_vera_by_hand():
    """λ' = Σ sqrt(w) λ_i on both sides: with shared λd = e and w = 1/2, ΔW' = Σ ΔW_i."""
    A, B = torch.eye(2), torch.eye(2)
    b = torch.tensor([[[1.0, 2.0], [3.0, -2.0]]])  # (1, 2, 2)
    e = torch.tensor([[[1.0, 0.5], [1.0, 0.5]]])
    out = get_method("task_arithmetic").merge_vera(
        VeraStack(b, e, A, B), ClassicConfig(), generator=torch.Generator(), context=CTX
    )
    root = math.sqrt(0.5)
    assert torch.allclose(out.lambda_b[0, 0], torch.tensor([4.0, 0.0]) * root)
    assert torch.allclose(out.lambda_d[0, 0], torch.tensor([2.0, 1.0]) * root)


@pytest.mark.parametrize("name", A_ONLY_METHODS)
def test_a_only_merges_lambda_d_and_keeps_every_lambda_b(name):
    stack = random_vera(G=2, K=3, seed=7)
    out = get_method(name).merge_vera(
        stack, ClassicConfig(), generator=torch.Generator().manual_seed(1), context=CTX
    )
    assert torch.equal(out.lambda_b, stack.lambda_b)
    assert out.lambda_d.shape == (2, 1, 3)
    assert out.routing.tolist() == [[0, 1, 2]] * 2
    if name == "task_arithmetic_a_only":
        assert torch.allclose(out.lambda_d[:, 0], stack.lambda_d.mean(1), atol=1e-6)


def test_every_registered_method_merges_vera_with_its_own_config():
    for name in list_methods():
        if name == "shared_basis":  # LoRA only (vera_config_class = None): refused by name
            with pytest.raises(HydraoptError, match="'shared_basis' does not merge VERA"):
                get_kind("vera").config_class(get_method(name))
            continue
        cls = get_kind("vera").config_class(get_method(name))
        assert cls is (VeraHydraOptConfig if name == "hydraopt" else ClassicConfig)
    config = resolve_config("hydraopt", {"heads": 2, "shared": "lambda_b"}, 3, "vera")
    assert config == VeraHydraOptConfig(heads=2, shared="lambda_b")
    with pytest.raises(HydraoptError, match="solver"):
        resolve_config("hydraopt", {"heads": 2, "solver": "paper"}, 3, "vera")
    with pytest.raises(HydraoptError, match="shared"):
        resolve_config("hydraopt", {"heads": 2, "shared": "lambda_d"}, 3, "lora")
    with pytest.raises(HydraoptError, match="exceeds"):
        resolve_config("hydraopt", {"heads": 4}, 3, "vera")
    with pytest.raises(HydraoptError, match="shared must be"):
        VeraHydraOptConfig(heads=1, shared="A")  # type: ignore[arg-type]


@pytest.mark.parametrize("shared", SIDES)
@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_hand_written_vera_mae_gradient_equals_autograd(shared, num_heads):
    from hydraopt.kinds.vera.merge import routed_error, vera_mae_value_and_grads

    stack = random_vera(G=2, K=4, seed=31)
    stack = VeraStack(*(t.double() for t in (stack.lambda_b, stack.lambda_d, stack.A, stack.B)))
    gen = torch.Generator().manual_seed(3)
    n_s, n_h = (3, 7) if shared == "lambda_d" else (7, 3)  # r = 3, d = 7
    s = torch.randn(2, n_s, generator=gen, dtype=torch.float64, requires_grad=True)
    heads = torch.randn(2, num_heads, n_h, generator=gen, dtype=torch.float64)
    heads.requires_grad_(True)
    routing = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]) % num_heads
    delta = stack.delta()
    loss = routed_error(delta, stack, shared, s, heads, routing, "mae").mean(1)
    loss.sum().backward()
    value, g_s, g_h = vera_mae_value_and_grads(
        delta, stack, shared, s.detach(), heads.detach(), routing, torch.empty_like(delta)
    )
    assert torch.allclose(value, loss.detach())
    assert torch.allclose(g_s, s.grad) and torch.allclose(g_h, heads.grad)
