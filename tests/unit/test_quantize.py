"""Group-wise quantization: round trip within the analytic bound, exact bytes, and the same codes
as torchao's own quantization primitives (an independent implementation)."""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from hydraopt.quantize import (
    dequantize,
    error_bound,
    quantize,
    quantized_nbytes,
)

REPO = Path(__file__).resolve().parents[2]


def _tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Mixed magnitudes per row, as LoRA factors have.
    return torch.randn(shape, generator=gen) * torch.logspace(-4, 0, shape[-1])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [2, 32, 64, 50])
@pytest.mark.parametrize("shape", [(32, 576), (3, 7, 5), (1,), (65,)])
def test_round_trip_within_half_a_step(bits: int, group_size: int, shape: tuple[int, ...]) -> None:
    x = _tensor(shape)
    q = quantize(x, bits, group_size)
    restored = dequantize(q)
    assert restored.shape == x.shape
    bound = error_bound(q)
    assert ((restored - x).abs() <= bound * (1 + 1e-6)).all()
    # The bound is tight: the step is the group's range over the codes, not a loose constant.
    groups = math.ceil(x.numel() / group_size)
    assert q.scales.shape == (groups,)
    assert (q.scales.float() > 0).all()


def test_step_is_absmax_over_half_the_code_range() -> None:
    x = torch.tensor([0.5, -3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    q = quantize(x, 4, 4)
    # Group 1: absmax 3 -> step 3 / 7.5 = 0.4 (float16 rounded up); group 2 all zero -> scale 1.
    assert q.scales[0].item() == pytest.approx(0.4, rel=1e-3)
    assert q.scales[0].float().item() >= 0.4
    assert q.scales[1].item() == 1.0
    # Codes round(x / step), step just above 0.4: [1, -7 (-7.49..), 2 (2.49..), 5 (4.99..)].
    assert (q.codes.to(torch.int16)[:2] & 0xF).tolist() == [1 + 8, 2 + 8]
    assert (q.codes.to(torch.int16)[:2] >> 4).tolist() == [-7 + 8, 5 + 8]


def test_exact_codes_by_hand() -> None:
    x = torch.tensor([1.0, -1.0, 0.25, 0.0])  # absmax 1 -> 8-bit step 1/127.5
    q = quantize(x, 8, 4)
    step = q.scales[0].float().item()
    assert step >= 1 / 127.5
    expected = [round(v / step) for v in x.tolist()]
    got = (q.codes.to(torch.int16) - 128).tolist()
    assert got == expected


@pytest.mark.parametrize("bits", [8, 4])
def test_nbytes_equal_stored_tensors_and_formula(bits: int) -> None:
    for numel, group in [(576 * 32, 64), (100, 64), (7, 2), (1, 64)]:
        q = quantize(_tensor((numel,)), bits, group)
        assert q.nbytes == quantized_nbytes(numel, bits, group)
        assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float16
        groups = -(-numel // group)
        assert q.nbytes == groups * group * bits // 8 + 2 * groups


def test_four_bit_codes_pack_two_per_byte_low_nibble_first() -> None:
    x = torch.tensor([-7.5, 7.0, 0.0, 1.0])  # step 1: codes -8, 7, 0, 1 -> stored 0, 15, 8, 9
    q = quantize(x, 4, 4)
    assert q.scales[0].item() == 1.0
    assert q.codes.tolist() == [0 | (15 << 4), 8 | (9 << 4)]


def test_zero_and_tiny_tensors() -> None:
    zero = quantize(torch.zeros(10), 4, 4)
    assert torch.equal(dequantize(zero), torch.zeros(10))
    tiny = torch.full((4,), 1e-9)
    assert (dequantize(quantize(tiny, 8, 4)) - tiny).abs().max() <= 1e-9


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"bits": 3}, "bits must be 8 or 4"),
        ({"bits": 16}, "bits must be 8 or 4"),
        ({"group_size": 0}, "group size"),
        ({"group_size": 3}, "even"),
    ],
)
def test_bad_arguments(bad: dict, message: str) -> None:
    args = {"bits": 8, "group_size": 4, **bad}
    with pytest.raises(ValueError, match=message):
        quantize(torch.ones(8), args["bits"], args["group_size"])


def test_refuses_non_finite_integer_and_huge() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([1.0, float("nan")]), 8, 2)
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(4, dtype=torch.int32), 8, 2)
    with pytest.raises(ValueError, match="too large"):
        quantize(torch.tensor([1e9, 0.0]), 8, 2)


def _torchao_primitives():
    """torchao's quant primitives from ``.venv/reference`` (the Makefile puts torchao there, beside
    the venv: installed in it, peft would import it everywhere and print warnings)."""
    reference = Path(os.environ.get("HYDRAOPT_REFERENCE", REPO / ".venv" / "reference"))
    if not (reference / "torchao").is_dir():
        pytest.skip(f"torchao not found in {reference} (make test installs it there)")
    sys.path.insert(0, str(reference))
    try:
        return importlib.import_module("torchao.quantization.quant_primitives")
    finally:
        sys.path.remove(str(reference))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_match_torchao_primitives(bits: int) -> None:
    ao = _torchao_primitives()
    group = 32
    x = _tensor((16, 96), seed=3)
    q = quantize(x, bits, group)
    q_min, q_max = (-128, 127) if bits == 8 else (-8, 7)
    grouped = x.reshape(-1, group)  # our groups: consecutive values in memory order
    # torchao's own choice of scales for the same mapping, before our float16 round-up ...
    scale, zero = ao.choose_qparams_affine(
        grouped, ao.MappingType.SYMMETRIC, (1, group), torch.int8, quant_min=q_min, quant_max=q_max
    )
    # ours is theirs rounded up to the next float16: the float16 below ours is < theirs <= ours.
    theirs = scale.reshape(-1)
    below = torch.nextafter(q.scales, torch.full_like(q.scales, -math.inf)).float()
    assert (below < theirs).all() and (theirs <= q.scales.float()).all()
    # ... and its codes and dequantized values given our stored scales.
    ours = q.scales.float()[:, None]
    codes = ao.quantize_affine(
        grouped,
        (1, group),
        ours,
        torch.zeros_like(ours, dtype=torch.int8),
        torch.int8,
        q_min,
        q_max,
    )
    values = ao.dequantize_affine(
        codes, (1, group), ours, torch.zeros_like(ours, dtype=torch.int8), torch.int8, q_min, q_max
    )
    assert torch.equal(dequantize(q), values.reshape(x.shape))
    stored = q.codes if bits == 8 else torch.stack([q.codes & 0xF, q.codes >> 4], 1).reshape(-1)
    assert torch.equal(stored.to(torch.int16) + q_min, codes.reshape(-1).to(torch.int16))


@pytest.mark.parametrize("bits", [8, 4])
def test_slices_keep_each_task_on_its_own_scales(bits: int) -> None:
    """(K, R, R) cores with R² = 25 and groups of 8: flat groups span tasks, so a task 10⁴× smaller
    than its neighbour shares the neighbour's step and rounds to zero; with slices = K each task
    has its own groups: its values come back within half of *its own* step."""
    x = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(1)) + 3.0  # all > 0
    x[0] *= 1e4  # (tasks 1 and 2 stay small)
    flat, sliced = quantize(x, bits, 8), quantize(x, bits, 8, slices=3)
    # Flat group 3 holds task 0's last value and task 1's first seven: those round to zero.
    assert (dequantize(flat)[1].reshape(-1)[:7] == 0).all() and (x[1] > 0).all()
    restored, bound = dequantize(sliced), error_bound(sliced)
    assert restored.shape == x.shape and ((restored - x).abs() <= bound * (1 + 1e-6)).all()
    for k in range(3):
        # Half a step of this task's own absmax, not task 0's: the bound is by hand.
        own = x[k].abs().amax() / ((15 if bits == 4 else 255) / 2) / 2
        assert bound[k].max() <= own * (1 + 2e-3)
    # Each slice pads to whole groups: ceil(25 / 8) = 4 groups per task, not ceil(75 / 8) = 10.
    assert sliced.scales.shape == (12,) and flat.scales.shape == (10,)
    assert sliced.nbytes == quantized_nbytes(75, bits, 8, slices=3) == 12 * 8 * bits // 8 + 24


def test_one_slice_is_the_flat_layout_bit_for_bit() -> None:
    x = _tensor((4, 6, 10))  # 60 values per slice: groups of 32 would span slices
    for slices in (1, 4):
        q = quantize(x, 4, 32, slices=slices)
        same = quantize(x, 4, 32)
        assert torch.equal(q.codes, same.codes) == (slices == 1)
    # Slices that fill whole groups change nothing either: 64 values per slice, groups of 32.
    y = _tensor((4, 8, 8))
    assert torch.equal(quantize(y, 4, 32, slices=4).codes, quantize(y, 4, 32).codes)
    with pytest.raises(ValueError, match="equal slices"):
        quantize(x, 4, 32, slices=7)
