"""check_finite's fast path (a finite sum clears a tensor) against the exact element check."""

from __future__ import annotations

import pytest
import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.adapter_dir import check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_non_finite_value_is_refused(bad, dtype):
    t = torch.randn(32, 64).to(dtype)
    t[5, 7] = bad
    with pytest.raises(HydraoptError, match="NaN or Inf"):
        check_finite(t, "x")


def test_infinities_of_both_signs_are_refused():
    t = torch.zeros(4, 4)
    t[0, 0], t[1, 1] = float("inf"), float("-inf")  # their sum is NaN: still refused
    with pytest.raises(HydraoptError):
        check_finite(t, "x")


def test_finite_values_whose_sum_overflows_pass():
    # The fast sum is inf here, so the exact check decides: every value is finite.
    t = torch.full((8, 8), 3e38)
    assert not bool(torch.isfinite(t.sum()))
    check_finite(t, "x")
    check_finite(torch.randn(32, 64), "x")
