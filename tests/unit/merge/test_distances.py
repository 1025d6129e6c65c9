"""The distances against values worked out by hand, and the separable formulas against them."""

from __future__ import annotations

import math

import pytest
import torch

from hydraopt.merge.distances import DISTANCES, SEPARABLE, get_distance

T = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # (d=2, k=2)
A = torch.tensor([[0.0, -2.0], [1.0, 1.0]])  # T - A = [[1, 0], [2, -1]]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mae", (1 + 0 + 2 + 1) / 4),  # mean |T - A|
        ("mse", (1 + 0 + 4 + 1) / 4),  # mean (T - A)²
        ("fro", math.sqrt(1 + 0 + 4 + 1)),  # ||T - A||_F
        # 1 - <T, A> / (|T| |A|) = 1 - (0 + 4 + 3 + 0) / (sqrt(14) sqrt(6))
        ("cos", 1 - 7 / math.sqrt(14 * 6)),
    ],
)
def test_golden_values_by_hand(name, expected):
    got = get_distance(name)(T, A)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cosine_distance_of_parallel_orthogonal_and_opposite_updates():
    f = get_distance("cos")
    ortho = torch.tensor([[2.0, 1.0], [0.0, 0.0]])  # <T, ortho> = 2 - 2 = 0
    assert f(T, 3.0 * T).item() == pytest.approx(0.0, abs=1e-12)
    assert f(T, ortho).item() == pytest.approx(1.0, abs=1e-12)
    assert f(T, -0.5 * T).item() == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize("name", DISTANCES)
def test_batched_over_leading_axes_equals_one_pair_at_a_time(name):
    gen = torch.Generator().manual_seed(0)
    t, a = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen)
    f = get_distance(name)
    batched = f(t, a)
    assert batched.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(batched[i, j], f(t[i, j], a[i, j]), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SEPARABLE))
def test_separable_formula_of_the_error_equals_the_distance(name):
    gen = torch.Generator().manual_seed(1)
    t, a = torch.randn(3, 6, 5, generator=gen), torch.randn(3, 6, 5, generator=gen)
    err = a - t
    got = SEPARABLE[name](err.clone(), 6 * 5)
    assert torch.allclose(got, get_distance(name)(t, a), rtol=1e-6)


def test_only_the_cosine_is_not_separable():
    assert set(DISTANCES) - set(SEPARABLE) == {"cos"}


def test_unknown_distance_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown distance 'l3'.*mae"):
        get_distance("l3")
